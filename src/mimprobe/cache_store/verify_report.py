"""What ``mimprobe verify`` found, and how it is told: :class:`Damage` (one finding: its kind, array, chunk and
rows) and :class:`VerifyReport` (every finding of one store, what was checked and how fast, the one-line verdict
and the repair hint). ``extract --repair`` reads the same report to decide what to rewrite and which chunks to
re-extract. The checks themselves are :mod:`.verify`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mimprobe.cache_store.integrity import ALGORITHM
from mimprobe.units import human_bytes


@dataclass
class Damage:
    kind: str  # chunk | index | metadata | attributes | done
    array: str  # "" for the store's own metadata / attributes
    what: str
    chunk: int | None = None
    rows: tuple[int, int] | None = None

    def line(self) -> str:
        if self.chunk is not None:
            rows = f" (rows {self.rows[0]}-{self.rows[1] - 1})" if self.rows else ""
            return f"{self.array} chunk {self.chunk}{rows}: {self.what}"
        return f"{self.array or 'attributes'}: {self.what}"


@dataclass
class VerifyReport:
    path: str
    format: str
    damage: list[Damage] = field(default_factory=list)
    has_checksums: bool = False
    num_chunks: int = 0
    done_chunks: int = 0
    complete: bool = False
    arrays_checked: list[str] = field(default_factory=list)
    chunk_records: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    unreadable: str | None = None  # the store's metadata cannot be read: nothing else was checked
    repairable: bool = True  # False: the damage cannot be repaired in place (re-extract)

    @property
    def ok(self) -> bool:
        return not self.damage

    def chunks_to_redo(self) -> set[int]:
        """Chunks whose data, checksum record or done flag is damaged: re-extracted by ``extract --repair``."""
        return {d.chunk for d in self.damage if d.kind in ("chunk", "done") and d.chunk is not None}

    def index_damage(self) -> set[str]:
        return {d.array for d in self.damage if d.kind == "index"}

    def metadata_damage(self) -> set[str]:
        return {d.array for d in self.damage if d.kind == "metadata"}

    def verdict(self) -> str:
        what = (f"{len(self.arrays_checked)} array(s) x {self.done_chunks} done chunk(s) "
                f"({self.chunk_records} chunk records), index arrays, done flags and attributes")
        how = f"{ALGORITHM} checksums" if self.has_checksums else \
            "presence and size only: no checksums (written before mimprobe recorded them)"
        rate = f"{human_bytes(self.bytes_read)} in {self.seconds:.2f} s" + (
            f" ({human_bytes(self.bytes_read / self.seconds)}/s)" if self.seconds > 0 else "")
        progress = (f"{self.done_chunks}/{self.num_chunks} chunks done" +
                    ("" if self.done_chunks == self.num_chunks or self.complete else
                     " (incomplete: finish it with the same extract command)"))
        if self.ok:
            return f"{self.path}: OK: {progress}; {what} checked ({how}); {rate}"
        if self.unreadable:
            return f"{self.path}: DAMAGED: {self.unreadable}; nothing else could be checked"
        kinds: dict[str, int] = {}
        for d in self.damage:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        names = {"chunk": "damaged chunk record(s)", "index": "damaged index array(s)",
                 "metadata": "damaged array metadata", "attributes": "attribute problem(s)",
                 "done": "done flag problem(s)"}
        summary = ", ".join(f"{n} {names[k]}" for k, n in kinds.items())
        return f"{self.path}: DAMAGED: {summary}; {progress}; ({how}); {rate}"

    def repair_hint(self) -> str:
        fixable = all(d.kind in ("chunk", "done", "index", "metadata") or d.array == "" for d in self.damage)
        from mimprobe.cache_store.formats import backend_class

        if not self.repairable or (self.unreadable or self.metadata_damage()) and \
                not backend_class(self.format).rewrites_metadata:
            return (f"repair: the metadata of a {self.format} store cannot be rewritten in place; re-extract with the "
                    "same `mimprobe extract` command and --overwrite")
        if fixable:
            return ("repair: re-run the `mimprobe extract` (or `compress`) command that made the store, with "
                    "--repair (only the damaged chunks are extracted again)")
        return "repair: re-extract with the same `mimprobe extract` command and --overwrite"
