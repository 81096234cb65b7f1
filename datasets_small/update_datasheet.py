"""Rewrite the generated part of DATASHEET.md (file table with item counts, bytes and sha256; split
statistics) from the files on disk. Run after make_shapes.py / make_digits.py / make_motion.py:

    python datasets_small/update_datasheet.py
"""
import hashlib, json
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SHEET = HERE / "DATASHEET.md"
BEGIN, END = "<!-- BEGIN GENERATED (update_datasheet.py) -->", "<!-- END GENERATED -->"


def main():
    files = sorted(p for p in HERE.rglob("*") if p.is_file() and p.suffix in (".npz", ".json"))
    lines = ["| file | items | bytes | sha256 |", "|---|---|---|---|"]
    for p in files:
        n = "-"
        if p.suffix == ".npz":
            with np.load(p) as z: n = str(len(z["label"]))
        lines.append(f"| `{p.relative_to(HERE)}` | {n} | {p.stat().st_size} | {hashlib.sha256(p.read_bytes()).hexdigest()} |")
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    lines += ["", f"Total size: {total / 2**20:.2f} MiB (every file under datasets_small/, scripts included; budget 24 MiB).", ""]
    for name in ["shapes", "digits", "motion"]:
        if not (HERE / name / "meta.json").is_file(): continue
        meta = json.loads((HERE / name / "meta.json").read_text())
        lines += [f"**{name}** (per split: items, clip duration range and mean in seconds, lowest clip RMS, "
                  f"log-mel correlation of decoded Opus vs. the uncompressed synthesis: minimum / median; class counts)", "",
                  "| split | items | clips | duration min-max (mean) s | min RMS | log-mel corr min / median | class counts |",
                  "|---|---|---|---|---|---|---|"]
        for s, st in meta["generation_stats"].items():
            lines.append(f"| {s} | {st['n']} | {st.get('n_clips', st['n'])} | {st['dur_min']:.2f}-{st['dur_max']:.2f} "
                         f"({st['dur_mean']:.2f}) | {st['rms_min']:.3f} | {st['logmel_corr_min']:.3f} / "
                         f"{st['logmel_corr_median']:.3f} | {' '.join(map(str, st['label_counts']))} |")
        lines.append("")
    text = SHEET.read_text()
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    SHEET.write_text(text[:a] + "\n" + "\n".join(lines) + "\n" + text[b:])
    print(f"updated {SHEET}: {len(files)} files, {total / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
