"""A ledger written in parts: the unit of a sharded (many-process) and of a resumed dump (docs/ledger.md,
"Dumps in parts").

The images of a split, in dump order, are cut into parts of `images_per_part` consecutive images.
Each part is written as a small ledger of its own into a staging folder `.OUT.parts/` beside the
ledger `OUT` and renamed there when whole (`part-FIRST-LAST`, the positions of its first and last
image in the split), so a stopped dump keeps every finished part. Row r of part k has
cand_id = k × CAND_ID_STRIDE + r: the numbering depends on the plan only, never on which process
wrote the part or in which run, and `suppressed_by` (a cand_id of the same image, so of the same
part) stays valid. Once every part is there, `assemble` builds `OUT`: candidates.parquet is the
one part's file, or a folder of the parts' files in order; the other files are the parts' files
concatenated in order; meta.json sums the counts.

The staging folder's manifest.json holds what the numbers depend on (the meta of the dump, the
images and the settings that change the floats); a resumed dump must match it.

Public API:
- CAND_ID_STRIDE, IMAGES_PER_PART, STAGING_SUFFIX
- Part(index, start, stop): .name, .first_cand_id; plan_parts(num_images, images_per_part) -> [Part]
- part_batches(positions, images_per_part, batch_size) -> [[position, ...], ...]: batches within parts
- staging_folder(out) -> Path; finished_parts(staging) -> set of part names
- read_manifest / write_manifest(staging, manifest); first_difference(a, b) -> dotted key or None
- assemble(out, staging, parts, meta) -> the ledger's meta (atomic: out appears whole or not at all)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from misalign.errors import InputError
from misalign.io import atomic_dir, write_json_atomic
from misalign.ledger import CANDIDATES, DETECTIONS, IMAGES, META, RAW, RAW_COUNTS

CAND_ID_STRIDE = 1 << 32  # cand_ids of one part: [k * stride, (k + 1) * stride); no part holds 2^32 rows
IMAGES_PER_PART = 128  # default: two row groups of 64 images; 40 parts for COCO val, 5 a process on 8 GPUs
STAGING_SUFFIX = ".parts"
MANIFEST = "manifest.json"
_CONCATENATED = (IMAGES, RAW_COUNTS, RAW)  # files concatenated from the parts (small, or opt-in raw)


@dataclass(frozen=True)
class Part:
    """Images [start, stop) of the split's dump order, the index-th part."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        """part-FIRST-LAST: positions of the first and last image in the split (inclusive)."""
        return f"part-{self.start:07d}-{max(self.stop - 1, self.start):07d}"

    @property
    def first_cand_id(self) -> int:
        return self.index * CAND_ID_STRIDE


def plan_parts(num_images: int, images_per_part: int = IMAGES_PER_PART) -> list[Part]:
    """The parts of a split of `num_images` images; an empty split is one empty part."""
    if images_per_part < 1:
        raise InputError(f"images per part: {images_per_part} must be at least 1")
    starts = range(0, max(num_images, 1), images_per_part)
    return [Part(k, start, min(start + images_per_part, num_images)) for k, start in enumerate(starts)]


def part_batches(positions, images_per_part: int, batch_size: int) -> list[list[int]]:
    """Batches of at most `batch_size` consecutive `positions`, none across a part's boundary.

    A batch's images are padded to a common size, which changes the model's floats: batches cut
    at the parts' starts are the same in a one-process, a sharded and a resumed dump.
    """
    batches: list[list[int]] = []
    for position in positions:
        last = batches[-1] if batches else None
        if (last is None or len(last) == batch_size or position != last[-1] + 1
                or position // images_per_part != last[-1] // images_per_part):
            batches.append([position])
        else:
            last.append(position)
    return batches


def staging_folder(out) -> Path:
    """`.OUT.parts` beside OUT: the same for every process and every run of one dump."""
    out = Path(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def finished_parts(staging: Path) -> set[str]:
    """Names of the parts renamed into place in `staging` (a part folder is only ever renamed whole)."""
    if not staging.is_dir():
        return set()
    return {p.name for p in staging.iterdir() if p.is_dir() and p.name.startswith("part-") and (p / META).is_file()}


def read_manifest(staging: Path) -> dict | None:
    path = staging / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: not valid JSON (run without --resume to start over)") from None


def write_manifest(staging: Path, manifest: dict) -> None:
    staging.mkdir(parents=True, exist_ok=True)
    write_json_atomic(staging / MANIFEST, manifest)


def first_difference(a, b, path: str = "") -> str | None:
    """The dotted key of the first value that differs between two JSON-like values, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if a == b else (path or "value")


def remove_stale(staging: Path) -> None:
    """Drop the half-written parts of a stopped run (hidden *.tmp folders)."""
    if staging.is_dir():
        for entry in staging.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                shutil.rmtree(entry, ignore_errors=True)


def assemble(out, staging: Path, parts: list[Part], meta: dict) -> dict:
    """Build the ledger `out` from the finished parts in `staging`; returns its meta.json.

    meta: the dump's meta.json keys on top of the parts' own (timing, say); the counts are summed.
    The parts' candidate files are hard-linked (copied where links are impossible), so the staging
    folder stays whole until `out` is in place, and the caller removes it then.
    """
    folders = [staging / part.name for part in parts]
    missing = [f for f in folders if not (f / META).is_file()]
    if missing:
        raise InputError(f"{missing[0]}: part missing; resume the dump (--resume) to write it")
    metas = [json.loads((f / META).read_text()) for f in folders]
    with atomic_dir(out) as tmp:
        if len(folders) == 1:
            _link(folders[0] / CANDIDATES, tmp / CANDIDATES)
        else:
            (tmp / CANDIDATES).mkdir()
            for part, folder in zip(parts, folders):
                _link(folder / CANDIDATES, tmp / CANDIDATES / f"{part.name}.parquet")
        for name in _CONCATENATED:
            _concatenate_parquet([f / name for f in folders if (f / name).is_file()], tmp / name)
        _concatenate_detections([f / DETECTIONS for f in folders], tmp / DETECTIONS)
        full = {**metas[0], **meta,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **{key: sum(m[key] for m in metas) for key in ("num_images", "num_candidates", "num_kept")}}
        write_json_atomic(tmp / META, full)
    return full


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _concatenate_parquet(sources: list[Path], target: Path) -> None:
    """The row groups of `sources`, in order, as one file (nothing when there is no source)."""
    if not sources:
        return
    schema = pq.read_schema(sources[0])
    with pq.ParquetWriter(target, schema) as writer:
        for source in sources:
            file = pq.ParquetFile(source)
            for group in range(file.num_row_groups):
                table = file.read_row_group(group)
                if table.num_rows:
                    writer.write_table(pa.Table.from_batches(table.to_batches(), schema=schema),
                                       row_group_size=table.num_rows)


def _concatenate_detections(sources: list[Path], target: Path) -> None:
    """One COCO results list from the parts' lists, in order (LedgerWriter writes "[" entries "\\n]\\n")."""
    with open(target, "w") as out:
        out.write("[")
        first = True
        for source in sources:
            body = source.read_text().strip()[1:-1].strip()  # the entries between the brackets
            if body:
                out.write(("" if first else ",") + "\n" + body)
                first = False
        out.write("\n]\n")
