"""The chapters as a course: each one opens with objectives and papers, ends with a summary and exercises whose
checks fail on the unsolved answer and pass on the worked solution, cites only numbers it computes, and runs to its
end as a student runs it (every cell, no test flags, on a CPU) without rewriting the installed library."""
import hashlib, json, math, os, re, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
ARTIFACTS = ROOT / "tests" / "artifacts"
PAGES = ("index", "notation")                    # the front door and the notation table: not chapters
CHAPTERS = sorted(p for p in NBS.glob("*.ipynb") if p.stem not in PAGES)
STUDENT_BUDGET_S = 15 * 60                       # all lessons together, as a student runs them on a 2-core CPU
PROJECT_BUDGET_S = 5 * 60                        # each project alone (its full sweep is one flag away)

def cells(nb:Path) -> list: return json.loads(nb.read_text())["cells"]
def source(cell) -> str: return "".join(cell["source"])
def directives(src:str) -> set:
    return {m.group(1) for m in re.finditer(r"^#\|\s*([\w-]+)", src, flags=re.M)}

# ---- cited numbers ------------------------------------------------------------------------------------------------
_CODE = re.compile(r"```.*?```|`[^`\n]*`|\]\([^)]*\)|<[^>\n]+>", re.S)
_MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$", re.S)
_NUMBER = re.compile(r"[−-]?\d[\d,]*(?:\.\d+)?")
_CITED = re.compile(r"(?<![\w.^_{/])(\d+(?:\.\d+)?\s?(?:%|\\%)|\d+(?:\.\d+)?\s?(?:×|\\times(?!\s*10))|[−-]?\d[\d,]*\.\d+)(?![\w^])")

def cited_numbers(markdown:str) -> list:
    """The numbers a prose cell cites as results: decimals, percentages and ratios in the prose, a formula that is a
    bare number (`$-2.8$`) and what follows `\\approx` in a formula. Settings are notation: `$\\tau=0.07$`, `code`."""
    text = _CODE.sub(" ", markdown)
    found = []
    def math(m):
        body = m.group().strip("$").strip()
        if re.fullmatch(r"[−-]?\d[\d,]*(?:\.\d+)?", body): found.append(body)
        found.extend(_NUMBER.findall(" ".join(re.findall(r"\\approx\s*([−-]?[\d.,]+)", body))))
        return " "
    prose = _MATH.sub(math, text)
    found.extend(m.group(1) for m in _CITED.finditer(prose))
    return found

def _value(num:str) -> tuple[float, float, bool]:
    "(value, half a unit of its last digit, is a percentage) of a cited number."
    s = num.replace("−", "-").replace(",", "").replace("\\%", "%").replace("\\times", "").replace("×", "").strip()
    pct = s.endswith("%")
    s = s.rstrip("%").strip()
    decimals = len(s.split(".")[1]) if "." in s else 0
    return float(s), 0.5 * 10 ** -decimals + 1e-12, pct

def appears_in(num:str, output:str) -> bool:
    "True when `output` prints a number that rounds to `num` (a percentage may be printed as a fraction)."
    value, tol, pct = _value(num)
    for tok in _NUMBER.findall(output.replace("−", "-")):
        try: x = float(tok.replace(",", ""))
        except ValueError: continue
        for cand in ([x, 100 * x] if pct else [x]):
            if abs(cand - value) <= tol: return True
    return False

def output_text(cell) -> str:
    "Everything a code cell printed or displayed as text (stream, plain, markdown, HTML without its tags)."
    parts = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream": parts.append("".join(o.get("text", "")))
        for kind in ("text/plain", "text/markdown", "text/html"):
            if kind in o.get("data", {}): parts.append(re.sub(r"<[^>]+>", " ", "".join(o["data"][kind])))
    return "\n".join(parts)

def uncited(nb_cells:list) -> list:
    "Cited numbers not printed by any code cell above the sentence, as 'number in: sentence'."
    missing, printed = [], ""
    for cell in nb_cells:
        if cell["cell_type"] == "code": printed += "\n" + output_text(cell); continue
        if cell["cell_type"] != "markdown": continue
        for num in cited_numbers(source(cell)):
            if not appears_in(num, printed):
                line = next((l for l in source(cell).splitlines() if num in l), "")
                missing.append(f"{num} in: {line.strip()[:120]}")
    return missing

FIGURES = ("application/vnd.plotly.v1+json", "image/png", "image/svg+xml", "application/vnd.jupyter.widget-view+json")

def unread_figures(nb_cells:list) -> list:
    "Figures (plots, images, widgets) with no prose after them before the next figure: nothing says what to notice."
    unread, pending = [], None
    for cell in nb_cells:
        if cell["cell_type"] == "markdown" and pending: pending = None
        elif cell["cell_type"] == "code" and any(k in o.get("data", {}) for o in cell.get("outputs", []) for k in FIGURES):
            if pending: unread.append(pending)
            pending = cell.get("id", "?")
    return unread + ([pending] if pending else [])

def test_cited_numbers_are_found_by_the_rules():
    md = ("The loss is about $-2.8$ here, 93.5% of pairs match and it is 3.2× faster; $\\log 16 \\approx 2.77$. "
          "Settings are notation: $\\tau=0.07$, `lr=0.5`, [v1.2](http://x/1.5), 16 frames, ViT-B/16, 2024.")
    assert cited_numbers(md) == ["-2.8", "2.77", "93.5%", "3.2×"]
    assert appears_in("-2.8", "uniformity -2.7999") and not appears_in("-2.8", "uniformity -1.71")
    assert appears_in("93.5%", "accuracy 0.9351") and appears_in("93.5%", "93.5 %") and not appears_in("93.5%", "0.92")
    assert appears_in("1,024.5", "1024.5") and not appears_in("0.43", "0.4")
    fake = [{"cell_type": "code", "outputs": [{"output_type": "stream", "text": "acc 0.912\n"}]},
            {"cell_type": "markdown", "source": ["accuracy reaches 0.91, not 0.95"]}]
    assert uncited(fake) == ["0.95 in: accuracy reaches 0.91, not 0.95"]
    fig = lambda i: {"cell_type": "code", "id": i, "outputs": [{"output_type": "display_data", "data": {FIGURES[0]: {}}}]}
    read = {"cell_type": "markdown", "source": ["Notice ..."]}
    assert unread_figures([fig("a"), read, fig("b"), {"cell_type": "code", "outputs": []}, read]) == []
    assert unread_figures([fig("a"), fig("b"), read, fig("c")]) == ["a", "c"]

# ---- structure: objectives, papers, notation, summary, exercises --------------------------------------------------
def exercises(nb_cells:list) -> dict:
    "{n: {'statement', 'check', 'solution'}} cell indices of each exercise of a chapter."
    ex = {}
    for i, c in enumerate(nb_cells):
        s = source(c)
        if c["cell_type"] == "markdown":
            for n in re.findall(r"\*\*Exercise (\d+)\b", s): ex.setdefault(int(n), {})["statement"] = i
        elif c["cell_type"] == "code":
            for n, sol in re.findall(r"check_exercise\((\d+),[^\n]*?(solution=True)?\);?\s*$", s, flags=re.M):
                ex.setdefault(int(n), {})["solution" if sol else "check"] = i
    return ex

PROJECT_SECTIONS = ["## Question", "## Hypothesis", "## Experiment", "## Results", "## Conclusion", "## Going further"]
def is_project(nb:Path) -> bool: return nb.stem.startswith("p") and nb.stem[1:2].isdigit()   # p1_..., p2_...: Projects

def check_project(nb:Path, cs:list):
    "A project: question (with the paper's claim, linked), hypothesis, experiment, results, conclusion, going further."
    md = [source(c) for c in cs if c["cell_type"] == "markdown"]
    heads = [l.strip() for s in md for l in s.splitlines() if l.startswith("## ")]
    assert heads == PROJECT_SECTIONS, f"{nb.name}: a project's sections are {PROJECT_SECTIONS}, found {heads}"
    question = md[[i for i, s in enumerate(md) if "## Question" in s][0]]
    assert re.search(r"\[[^\]]+\]\((https?://[^)]+)\)[\s\S]{0,80}?\b(19|20)\d\d\b", question), \
        f"{nb.name}: the question must cite the paper (title, year, link)"
    first_math = next((s for s in md if "$" in s), None)
    assert first_math is None or "notation.ipynb" in first_math, f"{nb.name}: the first equation must link to notation.ipynb"

@pytest.mark.parametrize("nb", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_is_a_lesson(nb):
    cs = cells(nb)
    if is_project(nb): return check_project(nb, cs)
    md = [source(c) for c in cs if c["cell_type"] == "markdown"]
    heads = [l for s in md for l in s.splitlines() if l.startswith("## ")]
    assert heads and heads[0] == "## Objectives", f"{nb.name}: the first section must be '## Objectives', found {heads[:1]}"
    opening = md[[i for i, s in enumerate(md) if "## Objectives" in s][0]]
    papers = re.findall(r"\[[^\]]+\]\((https?://[^)]+)\)[^\n]*\b(19|20)\d\d\b", opening)
    assert papers, f"{nb.name}: the objectives must list the papers taught (title, year, link)"
    first_math = next((s for s in md if "$" in s), None)
    assert first_math is None or "notation.ipynb" in first_math, f"{nb.name}: the first equation must link to notation.ipynb"
    assert "## Summary" in heads and "## Exercises" in heads, f"{nb.name}: needs '## Summary' and '## Exercises'"
    summary = md[[i for i, s in enumerate(md) if "## Summary" in s][0]]
    n_ideas = len(re.findall(r"^(?:-|\d+\.) ", summary, flags=re.M))
    assert 3 <= n_ideas <= 6, f"{nb.name}: the summary holds 3-6 ideas, found {n_ideas}"
    ex = exercises(cs)
    assert len(ex) >= 3, f"{nb.name}: at least 3 exercises, found {sorted(ex)}"
    for n, parts in ex.items():
        assert parts.keys() == {"statement", "check", "solution"}, f"{nb.name}: exercise {n} lacks {set(('statement', 'check', 'solution')) - parts.keys()}"
        assert parts["statement"] < parts["check"] < parts["solution"], f"{nb.name}: exercise {n}: statement, check, then solution"
        sol = cs[parts["solution"]]
        assert "solution" in directives(source(sol)), f"{nb.name}: exercise {n}'s solution cell needs `#| solution`"
        assert sol["metadata"].get("jupyter", {}).get("source_hidden") is True, f"{nb.name}: exercise {n}'s solution must be collapsed"

def test_exported_cells_are_short():
    long = [f"{nb.name} cell {c.get('id')}: {len(source(c).splitlines())} lines" for nb in CHAPTERS for c in cells(nb)
            if c["cell_type"] == "code" and "export" in directives(source(c)) and len(source(c).splitlines()) > 40]
    assert not long, "exported cells over 40 lines:\n" + "\n".join(long)

def test_no_chapter_exports_when_run():
    calls = [nb.name for nb in NBS.glob("*.ipynb") for c in cells(nb) if "nbdev_export" in source(c)]
    assert not calls, f"running these chapters would rewrite the library (nbdev_export): {calls}"

# ---- a student's Run All ------------------------------------------------------------------------------------------
def library_digest() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "mmlab").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts: h.update(str(p.relative_to(ROOT)).encode()); h.update(p.read_bytes())
    return h.hexdigest()

RUN = "import sys; from mmlab.docsite import execute_notebook as e; e(sys.argv[1], out=sys.argv[2], skip_flags=())"
TIMES = {}

@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    return tmp_path_factory.mktemp("executed")

@pytest.mark.parametrize("nb", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_student_run_all(nb, executed):
    "Run every cell as a student does on a CPU; the chapter reaches its end, cites what it computes, its checks work."
    env = {k: v for k, v in os.environ.items() if k not in ("IN_TEST", "MMLAB_TEST_FLAGS")}
    out = executed / nb.name
    before = library_digest()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN, str(nb), str(out)], cwd=nb.parent, env=env, capture_output=True,
                       text=True, timeout=1800)
    TIMES[nb.stem] = round(time.perf_counter() - t0, 1)
    assert r.returncode == 0, f"{nb.name} stopped before its end:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert library_digest() == before, f"running {nb.name} rewrote files under mmlab/"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "executed").mkdir(exist_ok=True)
    (ARTIFACTS / "executed" / nb.name).write_bytes(out.read_bytes())
    ran = json.loads(out.read_text())["cells"]
    assert not unread_figures(ran), f"{nb.name}: figures with no reading after them (cells {unread_figures(ran)})"
    missing = uncited(ran)
    assert not missing, f"{nb.name} cites numbers that no cell above prints:\n" + "\n".join(missing)
    for n, parts in exercises(ran).items():
        check, sol = output_text(ran[parts["check"]]), output_text(ran[parts["solution"]])
        assert f"Exercise {n}: not solved yet" in check, f"{nb.name}: exercise {n}'s check passes without an answer:\n{check}"
        assert f"Exercise {n}: the worked solution passes" in sol, f"{nb.name}: exercise {n}'s solution fails:\n{sol}"

def test_student_time_budget():
    "The lessons together, and each project alone, run within a student's CPU budget; the times land in tests/artifacts."
    if len(TIMES) < len(CHAPTERS): pytest.skip("needs every test_student_run_all to have run in this session")
    lessons = {k: v for k, v in TIMES.items() if not is_project(NBS / f"{k}.ipynb")}
    projects = {k: v for k, v in TIMES.items() if k not in lessons}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "chapter_times.json").write_text(json.dumps(TIMES | {"lessons": round(sum(lessons.values()), 1),
                                                                     "projects": round(sum(projects.values()), 1)}, indent=1))
    assert sum(lessons.values()) <= STUDENT_BUDGET_S, f"lessons took {sum(lessons.values()):.0f} s > {STUDENT_BUDGET_S} s: {lessons}"
    slow = {k: v for k, v in projects.items() if v > PROJECT_BUDGET_S}
    assert not slow, f"projects over their {PROJECT_BUDGET_S} s budget: {slow}"

# ---- the front door -----------------------------------------------------------------------------------------------
def test_index_is_the_path_through_every_chapter():
    "The index's parts list each chapter once, with its measured time, prerequisites and outcome; the site nav follows."
    from mmlab.docsite import course_outline, site_nav
    md = "\n".join(source(c) for c in cells(NBS / "index.ipynb") if c["cell_type"] == "markdown")
    outline = course_outline(md)
    listed = [nb for _, chapters in outline for _, nb in chapters]
    assert sorted(listed) == sorted(p.name for p in CHAPTERS) and len(set(listed)) == len(listed), listed
    site_nav(outline, [p.name for p in NBS.glob("*.ipynb")])        # raises if a page is off the path
    rows = re.findall(r"^\| \[[^\]]+\]\((\w+)\.ipynb\) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", md, flags=re.M)
    assert len(rows) == len(CHAPTERS), f"{len(rows)} chapter rows"
    for stem, t, needs, can in rows:
        assert re.fullmatch(r"\d+ s", t.strip()), f"index: {stem} needs its measured time, found {t!r}"
        assert needs.strip() == "—" or all(f"{n.strip()}_" in " ".join(p.stem + "_" for p in CHAPTERS) for n in needs.split(",")), needs
        assert len(can.split()) >= 5, f"index: say what {stem} teaches"
