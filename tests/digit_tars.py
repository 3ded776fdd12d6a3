"""Plain webdataset tars of the bundled digits, in sizes a test chooses, with bad samples where asked."""
import io
import tarfile
from pathlib import Path
from typing import Dict, List, Sequence


def write_digit_tars(folder: Path, name: str, sizes: Sequence[int], bad: Dict[int, List[str]] = None,
                     split: str = "val") -> str:
    """NAME-{0..n-1}.tar with ``sizes[i]`` good digit samples each (+ bad keys per shard) -> brace spec."""
    from vit_accel.data.digits import digits_samples

    train, val = digits_samples()
    pool = iter(val if split == "val" else train)
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):
        with tarfile.open(folder / f"{name}-{i}.tar", "w") as t:
            members = [(s.key, {"png": s.data, "cls": str(s.label).encode()}) for s in (next(pool) for _ in range(n))]
            # a truncated image: skipped, counted and recorded with its key and shard
            members += [(key, {"png": members[0][1]["png"][:40], "cls": b"3"}) for key in (bad or {}).get(i, [])]
            for key, files in members:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return str(folder / f"{name}-{{0..{len(sizes) - 1}}}.tar")
