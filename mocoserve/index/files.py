"""Every file of an index, named from its path in one place: `IndexFiles("out.faiss")`.

    out.faiss                        .faiss         the FAISS index, derived from the shards
    out.faiss.db                     .catalog       format 2: the catalog (index-level facts);
                                                    format 1: the sidecar (items, vectors too)
    out.faiss.lock                   .lock          the writer lock (flock), one writer an index
    out.faiss.shards/                .shards        the shards
      0003-of-0008/                  .shard(3, 8)   one shard (`ShardFiles` names what is inside)
        items.db                     .shard_db(3, 8)
        vectors-0000.f32             ShardFiles(folder).vectors("f32")
        lock                         ShardFiles(folder).lock, held by the shard's writer
    out.faiss.lists-7                .lists(7)      on-disk inverted lists of build 7
    .out.faiss.lists-7.piece-0       .pieces()      pieces of a build in progress

A damaged or missing file is refused by name: `DamagedIndex`, made by `refusal`.

(`mocoserve.ann` writes the pieces beside a lists file and the FAISS file through a temporary
`.out.faiss.tmp-PID`: it knows no index, only the paths it is given.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mocoserve.core.errors import UserError

SHARD_DB = "items.db"
SHARD_LOCK = "lock"


@dataclass(frozen=True)
class IndexFiles:
    """The files of the index whose FAISS file is `faiss`."""

    faiss: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "faiss", Path(self.faiss))

    @property
    def catalog(self) -> Path:
        return Path(f"{self.faiss}.db")

    @property
    def sidecar(self) -> Path:
        """Format 1's name for the same file: items and vectors were kept inside."""
        return self.catalog

    @property
    def lock(self) -> Path:
        return Path(f"{self.faiss}.lock")

    @property
    def shards(self) -> Path:
        return Path(f"{self.faiss}.shards")

    def shard(self, shard: int, shards: int) -> Path:
        """The folder of shard `shard` of `shards`."""
        return self.shards / f"{shard:04d}-of-{shards:04d}"

    def shard_db(self, shard: int, shards: int) -> Path:
        return self.shard(shard, shards) / SHARD_DB

    def lists(self, version: int, extra: int = 0) -> Path:
        """Build `version`'s on-disk inverted lists (`extra`: a name no file had yet)."""
        suffix = f"-{extra}" if extra else ""
        return self.faiss.with_name(f"{self.faiss.name}.lists-{version}{suffix}")

    def lists_files(self) -> list[Path]:
        """The on-disk lists files there are, of any build."""
        return sorted(self.faiss.parent.glob(f"{self.faiss.name}.lists-*"))

    def pieces(self) -> list[Path]:
        """Piece files a build of on-disk lists left (merged into the lists, then deleted)."""
        return sorted(self.faiss.parent.glob(f".{self.faiss.name}.lists-*.piece-*"))

    def has_data(self) -> bool:
        """Whether the FAISS file or any shard is there (what a new catalog would orphan)."""
        shards = self.shards
        return self.faiss.exists() or (shards.is_dir() and any(shards.iterdir()))


@dataclass(frozen=True)
class ShardFiles:
    """The files inside one shard's folder."""

    folder: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))

    @property
    def db(self) -> Path:
        return self.folder / SHARD_DB

    @property
    def lock(self) -> Path:
        return self.folder / SHARD_LOCK

    def vectors(self, ext: str) -> Path:
        """The vector file, `ext` naming its dtype (`f32`, `f16`)."""
        return self.folder / f"vectors-0000.{ext}"

    @property
    def index(self) -> Path:
        """The index this shard belongs to (`out.faiss` of `out.faiss.shards/0000-of-0004`)."""
        return Path(str(self.folder.parent).removesuffix(".shards"))


class DamagedIndex(UserError):
    """A file of the index is damaged or gone (told apart from bad input: a service
    answers it as its own fault, not the client's)."""


def refusal(problem: str, index: str | Path) -> DamagedIndex:
    """A reader's one line for damage it met: the file, and where to see the rest."""
    return DamagedIndex(f"{problem} (mocoserve index check {index} lists every problem)")
