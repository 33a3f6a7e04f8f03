"""What a build decides (`plan_build`), from plain facts alone, and the typed catalog it reads.

No FAISS index, no file: each branch of the decision, and `CatalogMeta`'s parsing (a bad value
names its key) and writing (what a writer writes reads back the same).
"""

from __future__ import annotations

import pytest

from mocoserve.ann.params import SearchSettings
from mocoserve.ann.planner import IndexChoice, Plan
from mocoserve.core.errors import UserError
from mocoserve.core.manifest import ModelFacts
from mocoserve.index.catalog import BUILT, CHOICE, MADE, CatalogMeta
from mocoserve.index.files import DamagedIndex
from mocoserve.index.writer import FaissFacts, Keep, Patch, Rebuild, Retune, plan_build

IVF = "IVF64,Flat"
TARGET = 0.95


def built(factory: str = IVF, tuned_ntotal: int = 10_000, tuned_target: float | None = TARGET):
    """A catalog as a build left it."""
    return CatalogMeta(
        dim=32, factory=factory, tuned_ntotal=tuned_ntotal, tuned_target=tuned_target
    )


def plan(factory: str = IVF) -> Plan:
    return Plan(factory, 0, 0, "the planner's reason")


IN_MEMORY = FaissFacts(present=True, on_disk=False, ivf=True)
ON_DISK = FaissFacts(present=True, on_disk=True, ivf=True)


def test_a_missing_faiss_file_is_rebuilt_as_the_catalog_names_it_without_a_note():
    decision = plan_build(built(), 10_000, plan(), TARGET, False, FaissFacts(present=False))
    assert decision == Rebuild(IVF, False, "the planner's reason", None)


def test_another_kind_is_rebuilt_as_the_plan_says_and_the_change_is_noted():
    decision = plan_build(built("Flat"), 10_000, plan(), TARGET, False, FaissFacts(True))
    assert isinstance(decision, Rebuild) and decision.factory == IVF
    assert decision.note == f"index type Flat -> {IVF} (the planner's reason)"


def test_an_ivf_within_twice_the_nlist_is_the_same_kind_and_kept():
    decision = plan_build(built("IVF40,Flat"), 10_000, plan("IVF64,Flat"), TARGET, False, IN_MEMORY)
    assert decision == Keep()
    far = plan_build(built("IVF16,Flat"), 10_000, plan("IVF64,Flat"), TARGET, False, IN_MEMORY)
    assert isinstance(far, Rebuild) and far.factory == "IVF64,Flat"


@pytest.mark.parametrize("found, disk", [(IN_MEMORY, True), (ON_DISK, False)])
def test_moving_the_lists_to_or_from_disk_rebuilds_the_same_factory(found, disk):
    decision = plan_build(built(), 10_000, plan(), TARGET, disk, found)
    assert decision == Rebuild(IVF, disk, "the planner's reason", None)


@pytest.mark.parametrize("n, rebuilt", [(10_999, False), (11_001, True), (8_999, True)])
def test_an_ivf_is_trained_anew_when_the_count_drifts_ten_percent(n, rebuilt):
    decision = plan_build(built(tuned_ntotal=10_000), n, plan(), TARGET, False, IN_MEMORY)
    assert isinstance(decision, Rebuild) is rebuilt


def test_a_flat_index_is_kept_whatever_the_drift():
    flat = FaissFacts(present=True, on_disk=False, ivf=False)
    assert plan_build(built("Flat", 10), 10_000, plan("Flat"), TARGET, False, flat) == Keep()


def test_a_new_recall_target_retunes_a_kept_index():
    decision = plan_build(built(tuned_target=0.9), 10_000, plan(), TARGET, False, IN_MEMORY)
    assert decision == Retune()
    never = plan_build(built(tuned_target=None), 10_000, plan(), TARGET, False, IN_MEMORY)
    assert never == Retune()  # an index from before targets were kept


@pytest.mark.parametrize("stale, missing", [(3, 0), (0, 5), (2, 2)])
def test_on_disk_lists_that_lag_the_store_are_patched(stale, missing):
    lagging = FaissFacts(True, on_disk=True, ivf=True, stale=stale, missing=missing)
    assert plan_build(built(), 10_000, plan(), TARGET, True, lagging) == Patch(retune=False)
    retuned = plan_build(built(tuned_target=0.9), 10_000, plan(), TARGET, True, lagging)
    assert retuned == Patch(retune=True)


def test_on_disk_lists_in_step_with_the_store_are_kept():
    assert plan_build(built(), 10_000, plan(), TARGET, True, ON_DISK) == Keep()


# --- the typed catalog ---


def test_the_catalog_parses_every_kind_of_value():
    meta = CatalogMeta.from_meta(
        {
            "format_version": "2",
            "dim": "512",
            "shards": "4",
            "store_dtype": "float16",
            "shards_made": "0,2",
            "labels": "folders",
            "index_type": "ivf",
            "max_index_memory": "1048576",
            "recall_target": "0.9",
            "on_disk": "true",
            "factory": "IVF64,Flat",
            "nprobe": "8",
            "ef_search": "",
            "k_factor": "2",
            "recall_at_10": "0.9812",
            "qps": "",
            "on_disk_built": "true",
            "version": "3",
            "built_at": "1700000000.5",
        }
    )
    assert (meta.format_version, meta.dim, meta.shards, meta.store_dtype) == (2, 512, 4, "float16")
    assert meta.shards_made == {0, 2} and meta.labelled_by_folders
    assert meta.choice == IndexChoice("ivf", 1 << 20, 0.9, True)
    assert meta.settings == SearchSettings(8, None, 2)
    assert (meta.recall_at_10, meta.qps, meta.on_disk_built) == (0.9812, None, True)
    assert (meta.version, meta.built_at) == (3, 1700000000.5)


def test_a_missing_key_or_an_empty_value_is_the_default():
    meta = CatalogMeta.from_meta({"dim": "", "k_factor": ""})
    assert meta == CatalogMeta()
    assert (meta.dim, meta.shards, meta.factory, meta.version, meta.model_sha256) == (
        0,
        1,
        "Flat",
        0,
        None,
    )
    assert meta.shards_made is None  # an index from before the catalog listed its shards
    assert CatalogMeta.from_meta({"shards_made": ""}).shards_made is None


@pytest.mark.parametrize(
    "key, value, kind",
    [
        ("dim", "512.0", "an integer"),
        ("shards", "four", "an integer"),
        ("recall_at_10", "high", "a number"),
        ("on_disk_built", "yes", "true or false"),
        ("shards_made", "0,x", "a list of shard numbers"),
        ("nprobe", "8k", "an integer"),
        ("max_index_memory", "4G", "an integer"),
        ("on_disk", "1", "true or false"),
    ],
)
def test_a_malformed_value_is_a_damaged_index_naming_its_key(key, value, kind):
    with pytest.raises(DamagedIndex) as raised:
        CatalogMeta.from_meta({key: value}, "out.faiss.db")
    assert str(raised.value) == (
        f"out.faiss.db is damaged: its meta value {key} is {value!r}, not {kind}"
    )


def test_what_a_writer_writes_reads_back_the_same():
    made = CatalogMeta().made_with(ModelFacts("ab" * 32, 128, "/m"), 4, "float16")
    meta = made.replace(
        choice=IndexChoice("auto", 1 << 30, 0.97, False),
        factory="IVF256,PQ16",
        settings=SearchSettings(16, None, 4),
        tuned_ntotal=123_456,
        tuned_target=0.97,
        recall_at_10=0.97123,
        qps=2512.6,
        plan_why="over the budget",
        ram_bytes=1 << 20,
        disk_bytes=0,
        version=2,
        built_at=1700000000.25,
    )
    table = meta.to_meta()
    assert table["recall_at_10"] == "0.9712" and table["qps"] == "2513"  # as measured
    again = CatalogMeta.from_meta(table)
    assert again == meta.replace(recall_at_10=0.9712, qps=2513.0)
    assert set(meta.to_meta(MADE)) == set(MADE) and set(meta.to_meta(CHOICE)) == set(CHOICE)
    assert set(meta.to_meta(BUILT)) == set(BUILT)


def test_a_build_without_a_measure_clears_the_old_one():
    table = CatalogMeta(recall_at_10=None, qps=None).to_meta(BUILT)
    assert table["recall_at_10"] == "" and table["qps"] == ""
    assert "model_sha256" not in CatalogMeta().to_meta()  # absent: a new index


def test_another_model_or_another_dimension_is_refused_by_one_check():
    meta = CatalogMeta(model_sha256="a" * 64, dim=512)
    meta.check_model("out.faiss", "a" * 64, 512)
    meta.check_model("out.faiss", "a" * 64)  # dimension unknown: not checked
    with pytest.raises(UserError, match=r"out.faiss was built with a different model .*aaaa"):
        meta.check_model("out.faiss", "b" * 64, 512)
    with pytest.raises(UserError, match="holds 512-d vectors; this model makes 128-d"):
        meta.check_model("out.faiss", "a" * 64, 128)
    CatalogMeta(dim=0).check_model("out.faiss", "c" * 64, 128)  # nothing recorded yet


def test_fp16_is_kept_for_the_gpu_only_with_room_under_the_target():
    assert CatalogMeta(recall_at_10=0.99).fp16_keeps_target(0.95)
    assert not CatalogMeta(recall_at_10=0.9505).fp16_keeps_target(0.95)
    assert CatalogMeta(recall_at_10=None).fp16_keeps_target(0.95)
    assert CatalogMeta(store_dtype="float16", recall_at_10=0.9).fp16_keeps_target(0.95)
