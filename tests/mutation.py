"""Mutation testing of mmlab's numerical, training and data modules (mutmut; not in CI: it takes long).

    python tests/mutation.py --sample 400 --seed 0   # a seeded random sample of the mutants (~1 h on 2 cores)
    python tests/mutation.py --all                   # every mutant (about 10,000: a day on 2 cores)
    python tests/mutation.py --sample 400 --seed 0 --module train   # the sample's mutants of one module
    python tests/mutation.py --sample 400 --seed 0 --report-only    # re-read results, write the report

The scope and the tests each mutant runs are configured in pyproject.toml ([tool.mutmut]): mutmut maps every
function to the fast tests that call it and runs only those, in a forked copy of the kit under `mutants/`.
Results stay in `mutants/` (ignored by git), so a rerun only re-tests mutants whose function changed; pass
`--rerun` to re-test the sample's survivors after adding tests.

A mutant counts as killed when a test fails, errors, times out or crashes. Survivors that cannot change
behaviour are listed, with the reason, in tests/mutation_equivalent.toml (mutants that only edit a docstring are
recognised as equivalent without a listing); the score is
killed / (sampled - equivalent). The report (per-module scores, every survivor with its diff) goes to
`mutants/mutation-report.md` and `.json`; `--out FILE.md` writes the markdown elsewhere too.
"""
import argparse, functools, json, os, random, subprocess, sys, tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTANTS = ROOT / "mutants"
EQUIVALENT = ROOT / "tests" / "mutation_equivalent.toml"
KILLED = {"killed", "timeout", "segfault"}   # a crash or a hang is noticed too
# The copy under mutants/ has no nbs/, so mmlab.core would not find the checkout's settings (data root).
os.environ.setdefault("MMLAB_SETTINGS", str(ROOT / "settings.ini"))


def mutmut(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, **kw)


def generate():
    "Write the mutated copy of the kit under mutants/ (mutmut skips files that did not change)."
    code = ("from mutmut.__main__ import copy_src_dir, copy_also_copy_files, create_mutants; import os\n"
            "os.makedirs('mutants', exist_ok=True); copy_src_dir(); copy_also_copy_files(); create_mutants(2)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def exit_codes() -> dict:
    "mutant name -> mutmut exit code (None: not run yet), read from the .meta files mutmut keeps."
    out = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        out |= json.loads(meta.read_text())["exit_code_by_key"]
    return out


def status(code) -> str:
    from mutmut.stats import status_by_exit_code
    return status_by_exit_code[code]


def module_of(name:str) -> str:
    "mmlab.losses.contrastive.x_clip_loss__mutmut_3 -> losses.contrastive"
    return ".".join(p for p in name.split(".")[1:] if not p.startswith(("x_", "x\u01c1")))


def choose(names:list, args) -> list:
    names = sorted(names)
    if not args.all:
        if args.sample > len(names): sys.exit(f"--sample {args.sample}: only {len(names)} mutants exist")
        names = sorted(random.Random(args.seed).sample(names, args.sample))
    if args.module: names = [n for n in names if module_of(n) == args.module]
    return names


def run(names:list, rerun:bool, children:int):
    "Test the mutants that have no result yet (with --rerun: also the survivors)."
    for attempt in range(2):    # mutmut may reset cached results when tests change: test those too, once
        codes = exit_codes()
        todo = [n for n in names if codes[n] is None or (rerun and attempt == 0 and status(codes[n]) not in KILLED)]
        print(f"{len(names)} mutants chosen, {len(todo)} to test", flush=True)
        for i in range(0, len(todo), 1000):              # each call re-runs the clean tests: few, long calls
            mutmut("run", "--max-children", str(children), *todo[i:i + 1000], check=False)


def diff_of(name:str) -> str:
    r = mutmut("show", name, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith(("+", "-")) and not l.startswith(("+++", "---"))]
    return "\n".join(lines) or r.stdout.strip()


@functools.lru_cache(None)
def docstring_lines(module:str) -> set:
    "Source lines (stripped) of every docstring in the checkout's `mmlab.<module>`."
    import ast
    path = ROOT / "mmlab" / (module.replace(".", "/") + ".py")
    src = path.read_text(); lines = src.splitlines(); out = set()
    for node in ast.walk(ast.parse(src)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            out |= {lines[i].strip() for i in range(body[0].lineno - 1, body[0].end_lineno)}
    return out


def only_docstring(name:str, diff:str) -> bool:
    "True when the mutant edits nothing but docstring text (mutmut mutates docstrings as strings)."
    removed = [l[1:].strip() for l in diff.splitlines() if l.startswith("-")]
    return bool(removed) and all(l in docstring_lines(module_of(name)) for l in removed)


def report(names:list, args) -> dict:
    codes, equivalent = exit_codes(), tomllib.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    diffs = {n: diff_of(n) for n in names if status(codes[n]) not in KILLED}
    equivalent |= {n: "docstring text only" for n, d in diffs.items() if n not in equivalent and only_docstring(n, d)}
    rows = {n: status(codes[n]) for n in names}
    per_module = {}
    for n, s in rows.items():
        m = per_module.setdefault(module_of(n), Counter())
        m["mutants"] += 1
        m["killed" if s in KILLED else "equivalent" if n in equivalent else s] += 1
    total = Counter()
    for c in per_module.values(): total.update(c)
    score = lambda c: c["killed"] / max(1, c["mutants"] - c["equivalent"])
    lines = [f"# Mutation report", "",
             f"Command: `python tests/mutation.py {' '.join(sys.argv[1:])}` (mutmut, scope and tests in pyproject.toml).",
             f"Score = killed / (mutants - equivalent). Total: **{total['killed']} / "
             f"{total['mutants'] - total['equivalent']} = {score(total):.1%}** ({total['equivalent']} equivalent).", "",
             "| module | mutants | killed | equivalent | survived | no tests | other | score |",
             "|---|---|---|---|---|---|---|---|"]
    for m, c in sorted(per_module.items()):
        other = c["mutants"] - c["killed"] - c["equivalent"] - c["survived"] - c["no tests"]
        lines.append(f"| {m} | {c['mutants']} | {c['killed']} | {c['equivalent']} | {c['survived']} | "
                     f"{c['no tests']} | {other} | {score(c):.1%} |")
    lost = [n for n, s in rows.items() if s not in KILLED]
    lines += ["", "## Not killed", ""]
    for n in lost:
        why = f"equivalent: {equivalent[n]}" if n in equivalent else rows[n]
        lines += [f"### {n} ({why})", "```diff", diffs[n], "```", ""]
    md = "\n".join(lines) + "\n"
    (MUTANTS / "mutation-report.md").write_text(md)
    result = {"command": sys.argv[1:], "per_module": {m: dict(c) for m, c in per_module.items()},
              "total": dict(total), "score": score(total), "status": rows}
    (MUTANTS / "mutation-report.json").write_text(json.dumps(result, indent=1))
    if args.out: Path(args.out).write_text(md)
    print("\n".join(lines[:len(per_module) + 6]))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--sample", type=int, help="test a seeded random sample of this many mutants")
    g.add_argument("--all", action="store_true", help="test every mutant")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    p.add_argument("--module", help="only the chosen mutants of this module, e.g. train or losses.contrastive")
    p.add_argument("--rerun", action="store_true", help="re-test the chosen survivors (after adding tests)")
    p.add_argument("--report-only", action="store_true", help="write the report from the results so far")
    p.add_argument("--children", type=int, default=2, help="mutants tested at once")
    p.add_argument("--out", help="also write the markdown report here")
    args = p.parse_args(argv)
    generate()
    names = choose(list(exit_codes()), args)
    if not args.report_only: run(names, args.rerun, args.children)
    return report(names, args)


if __name__ == "__main__":
    main()
