"""What a new user tripped on, one test each (issue 19, item 12): files left behind by a refused
command, an empty index that says nothing, /docs that needs the internet, help that misleads,
and a training log that repeats itself.
"""

import json
import re

import pytest
import typer.main
from fastapi.testclient import TestClient
from typer.core import TyperArgument, TyperGroup, TyperOption
from typer.testing import CliRunner

from mocoserve.cli import app
from mocoserve.service.main import create_app
from mocoserve.service.state import ServiceConfig

runner = CliRunner()
WIDE = {"COLUMNS": "400", "TERM": "dumb"}  # one help row per option


def error_line(result) -> str:
    """The one `error:` line of a refused command (and no traceback)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_embed_of_a_missing_folder_leaves_no_index(tmp_path, flat_dir, model_dir):
    index = tmp_path / "new.faiss"
    for folders in ([tmp_path / "no-such"], [flat_dir, tmp_path / "no-such"]):
        args = ["embed", *map(str, folders), "--index", str(index), "--model", str(model_dir)]
        result = runner.invoke(app, [*args, "-q", "--workers", "0"])
        assert result.exit_code == 2
        assert f"{tmp_path / 'no-such'} does not exist" in error_line(result)
        assert sorted(tmp_path.iterdir()) == []  # no catalog, lock or shards folder


def test_search_on_an_empty_index_says_it_is_empty(tmp_path, flat_dir, model_dir):
    empty, index = tmp_path / "empty", tmp_path / "e.faiss"
    empty.mkdir()
    made = runner.invoke(app, ["embed", str(empty), "--index", str(index), "-m", str(model_dir)])
    assert made.exit_code == 0, made.output
    query = str(sorted(flat_dir.glob("*.png"))[0])
    table = runner.invoke(app, ["search", str(index), query])
    assert table.exit_code == 0  # not the command's fault: a note, not an error
    assert table.stdout == ""  # no empty table
    assert table.stderr.strip() == (
        f"note: {index} holds no images; add some with mocoserve embed FOLDER --index {index}"
    )
    as_json = runner.invoke(app, ["search", str(index), query, "--json"])
    assert as_json.exit_code == 0 and "holds no images" in as_json.stderr
    assert json.loads(as_json.stdout) == [{"query": query, "in_index": False, "results": []}]


def test_a_refused_knn_makes_no_report_folder(tmp_path, monkeypatch, model_dir):
    monkeypatch.chdir(tmp_path)  # --out defaults to ./report
    gone = runner.invoke(app, ["knn", "--train-index", str(tmp_path / "nowhere.faiss"), "--loo"])
    assert gone.exit_code == 2 and "is not an index" in error_line(gone)
    assert not (tmp_path / "report").exists()
    base = ["knn", "--model", str(model_dir), "--loo", "--out", str(tmp_path / "r")]
    missing = runner.invoke(app, [*base, "--train", str(tmp_path / "no-such")])
    assert missing.exit_code == 2
    assert f"--train {tmp_path / 'no-such'} is not a folder" in error_line(missing)
    assert sorted(tmp_path.iterdir()) == []  # neither ./report nor --out


def _page_urls(html: str) -> list[str]:
    """Every script, stylesheet, icon and spec URL a docs page loads."""
    return re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_nothing_from_another_host(page, tmp_path):
    # the routes and static files of the real app; no model is loaded (no lifespan)
    client = TestClient(create_app(ServiceConfig(model=tmp_path / "model", ui=False)))
    answer = client.get(page)
    assert answer.status_code == 200
    assert "//" not in re.sub(r"window\.location\.origin", "", answer.text)  # no other host
    urls = [a or b for a, b in _page_urls(answer.text)]
    assert any(u.endswith(".js") for u in urls), urls
    for url in urls:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 1000, url


def test_the_docs_assets_are_behind_the_api_keys_like_the_docs(tmp_path):
    key = "k3y-for-the-tests-0123456789"
    config = ServiceConfig(model=tmp_path / "model", ui=False, api_keys=(key,))
    client = TestClient(create_app(config))
    urls = [a or b for a, b in _page_urls(client.get("/docs", headers=auth(key)).text)]
    assert urls
    for url in urls:
        assert client.get(url).status_code == 401, url
        assert client.get(url, headers=auth(key)).status_code == 200, url


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def commands() -> dict[str, object]:
    """Every command of `mocoserve`, by its path ("train", "index build")."""
    found = {}

    def walk(group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            if isinstance(cmd, TyperGroup):
                walk(cmd, f"{prefix}{name} ")
            else:
                found[f"{prefix}{name}"] = cmd

    walk(typer.main.get_command(app), "")
    return found


def help_of(path: str) -> str:
    result = runner.invoke(app, [*path.split(), "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def test_help_names_arguments_in_capitals_and_gives_flags_no_type():
    for path, cmd in [("", None), ("index", None), *commands().items()]:
        text = help_of(path)
        assert "<bool>" not in text, path
        usage = next(ln for ln in text.splitlines() if "Usage:" in ln)
        assert "{" not in usage, usage
        for param in getattr(cmd, "params", []):
            if isinstance(param, TyperArgument):
                assert param.name.upper() in usage, usage


def test_train_and_embed_show_what_each_option_defaults_to():
    # options without a default: inputs, a folder to compare with, a stop, a repeatable field
    no_default = {"--config", "--val", "--pretrained", "--max-steps", "--set", "--index"}
    no_default |= {"--quiet", "--help", "--strict", "--shard"}
    for path in ("train", "embed"):
        rows = [ln for ln in help_of(path).splitlines() if re.match(r"^│\s+(\*\s+)?--", ln)]
        assert len(rows) > 10, path
        for row in rows:
            option = re.search(r"--[\w-]+", row).group()
            if option not in no_default:
                assert "[default:" in row or "(default:" in row or "Default:" in row, row


def test_help_says_what_each_command_needs_and_describes_lincls_as_it_is():
    assert "needed for a new index" in help_of("embed")
    assert "Give --index, --model or both" in help_of("serve")
    lincls = help_of("lincls")
    assert "unlabelled" not in lincls and "k-NN" not in lincls
    assert "Labelled image folder" in lincls


def test_a_short_option_means_the_same_long_option_in_every_command():
    short_of: dict[str, set[str]] = {}
    long_of: dict[str, set[str]] = {}
    for cmd in commands().values():
        for param in cmd.params:
            if not isinstance(param, TyperOption):
                continue
            longs = [o for o in param.opts if o.startswith("--")]
            for short in (o for o in param.opts if not o.startswith("--")):
                for long in longs:
                    short_of.setdefault(long, set()).add(short)
                    long_of.setdefault(short, set()).add(long)
    assert {k: v for k, v in short_of.items() if len(v) > 1} == {}
    assert {k: v for k, v in long_of.items() if len(v) > 1} == {}
    assert short_of["--temperature"] == {"-T"}


def test_train_to_a_file_logs_each_epoch_once(flat_dir, tmp_path):
    args = ["train", str(flat_dir), "--arch", "resnet18", "--image-size", "32", "--dim", "8"]
    args += ["-b", "12", "-K", "24", "--epochs", "2", "--workers", "0"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "run")])  # not a terminal
    assert result.exit_code == 0, result.output
    epochs = re.findall(r"^epoch (\d+)\s+step", result.output, re.MULTILINE)
    assert epochs == ["1", "2"], result.output
    assert "━" not in result.output and "epoch 1/2" not in result.output  # no bar copies


def test_the_defaults_train_shows_are_the_configs():
    """train's help states defaults by hand (importing the config would load torch for
    --help): each must be what the config gives, plain and with the cifar preset."""
    from mocoserve.train.configure import build_config

    fields = {
        "--lr": "optim.lr",
        "--epochs": "optim.epochs",
        "--method": "method.name",
        "--arch": "model.arch",
        "--queue-size": "method.queue_size",
        "--bn-splits": "model.bn_splits",
        "--temperature": "method.temperature",
        "--moco-m": "method.momentum",
        "--dim": "model.dim",
        "--image-size": "data.image_size",
        "--precision": "run.precision",
        "--save-every": "run.save_every",
        "--knn-every": "run.knn_every",
    }
    plain, cifar = build_config(), build_config(preset="cifar")

    def value(cfg, dotted: str) -> str:
        section, name = dotted.split(".")
        return str(getattr(getattr(cfg, section), name))

    shown = {
        next(o for o in p.opts if o.startswith("--")): p.show_default
        for p in commands()["train"].params
        if isinstance(p, TyperOption)
    }
    for option, dotted in fields.items():
        parts = [part.strip() for part in str(shown[option]).split(";")]
        assert parts[0] == value(plain, dotted), (option, shown[option])
        for part in parts[1:]:
            if part.startswith("cifar "):
                assert part.removeprefix("cifar ") == value(cifar, dotted), (option, part)
