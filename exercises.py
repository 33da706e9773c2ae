"""
Classroom exercises: write the key parts of CLIP yourself, checked automatically against this project's own code.
Modelled on CS231n's assignments (fill in a marked region; a check reports the relative error against a reference),
nbgrader (hand out, collect, grade), Karpathy's minbpe exercise.md and the `cmp` of his backprop exercise (exact /
approximate / max difference).

    python exercises.py list                     # the exercises, and where your workspace stands with each
    python exercises.py start [DIR]              # copy the stubs into a workspace (default: workspace/)
    python exercises.py check clip_loss          # your clip_loss against losses.py's, check by check
    python exercises.py check --all --json       # every exercise, as JSON (for collecting a class's results)
    python exercises.py hint clip_loss [N]       # the next hint (or hint N)

The stubs are exercises/NAME.py; their checks and hints are in exercises/checks.py; the teachers' guide is
exercises/README.md. Checks run in seconds on a CPU, offline.
"""
import argparse
import json
import shutil
import sys
import textwrap
from pathlib import Path

from exercises.checks import EXERCISES
from exercises.grading import format_report, grade, report_dict, shown

ROOT = Path(__file__).resolve().parent
WORKSPACE = ROOT / "workspace"


class UsageError(Exception):
    """Bad input on the command line: printed as one line "error: ...", exit status 1."""


def exercise(name):
    if name not in EXERCISES:
        raise UsageError(f"unknown exercise {name!r}; the exercises: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def workspace(path):
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"no workspace {shown(path)}/: python exercises.py start {shown(path)} copies the stubs there")
    return path


def compared_with(e):
    """'losses.py clip_loss': where the project's own version of each function is."""
    return ", ".join(f"{module.replace('.', '/')}.py {name}" for module, name in
                     (target.split(":") for target in e.solution.values()))


# -----------------------------------------------------------------------------
# The commands


def status(e, ws):
    """not started / fails / passes / missing, for the exercise's file in workspace ws."""
    path = ws / f"{e.name}.py"
    if path.is_file() and path.read_bytes() == e.stub.read_bytes():
        return "not started"  # untouched: no need to run it
    return grade(e, path).status


def cmd_list(args):
    ws = Path(args.workspace)
    print(f"{'exercise':20s} {'min':>4s}  {'topic':72s} status ({shown(ws)}/)")
    for e in EXERCISES.values():
        print(f"{e.name:20s} {e.minutes:4d}  {e.topic:72s} {status(e, ws) if ws.is_dir() else '-'}")
    if not ws.is_dir():
        print(f"no workspace {shown(ws)}/ yet: python exercises.py start {shown(ws)}")
    return 0


def cmd_start(args):
    ws, names = Path(shown(args.dir)), [exercise(n).name for n in args.only or EXERCISES]
    kept = [n for n in names if (ws / f"{n}.py").exists() and not args.force]
    if kept and len(kept) == len(names):
        raise UsageError(f"{ws}/ already holds {'all ' * (len(names) > 1)}{len(names)} of these exercise files "
                         "(your work): nothing copied; --force replaces them with fresh stubs (--only NAME for one)")
    ws.mkdir(parents=True, exist_ok=True)
    copied = [n for n in names if n not in kept]
    for n in copied:
        shutil.copyfile(EXERCISES[n].stub, ws / f"{n}.py")
    print(f"copied {len(copied)} stub(s) into {ws}/" + (f" (kept your {len(kept)} file(s))" if kept else ""))
    option = "" if ws.resolve() == WORKSPACE else f" --workspace {ws}"
    print(f"next: python exercises.py list{option}; fill in {ws}/{copied[0]}.py; "
          f"python exercises.py check {copied[0]}{option}")
    return 0


def cmd_check(args):
    if bool(args.name) == args.all:
        raise UsageError("name one exercise (python exercises.py check clip_loss) or pass --all")
    chosen = list(EXERCISES.values()) if args.all else [exercise(args.name)]
    ws = workspace(args.workspace)
    reports = [grade(e, ws / f"{e.name}.py") for e in chosen]
    counts = {s: sum(r.status == s for r in reports) for s in ("passes", "fails", "not started", "missing")}
    if args.json:
        print(json.dumps({"workspace": str(ws), "summary": counts, "exercises": [report_dict(r) for r in reports]},
                         indent=1))
    else:
        for e, r in zip(chosen, reports):
            print(format_report(r, compared_with(e)))
        if args.all:
            print(f"{len(reports)} exercises: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0 if counts["passes"] == len(reports) else 1


def cmd_hint(args):
    e = exercise(args.name)
    ws = Path(args.workspace)
    state = ws / ".hints.json" if ws.is_dir() else None  # how many hints of each exercise were shown
    seen = json.loads(state.read_text()) if state and state.is_file() else {}
    n = args.n if args.n is not None else seen.get(e.name, 0) + 1
    if args.n is not None and not 1 <= n <= len(e.hints):
        raise UsageError(f"{e.name} has hints 1 to {len(e.hints)}, not {n}")
    if n > len(e.hints):
        print(f"all {len(e.hints)} hints of {e.name} shown; python exercises.py hint {e.name} 1 shows the first again")
        return 0
    print(textwrap.fill(f"{e.name}, hint {n} of {len(e.hints)}: {e.hints[n - 1]}", 110, subsequent_indent="  "))
    if state:
        state.write_text(json.dumps({**seen, e.name: n}))
    return 0


# -----------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=textwrap.fill("the exercises, in the suggested order: " + ", ".join(EXERCISES),
                                                     100))
    commands = p.add_subparsers(dest="command", required=True)
    ws = dict(default=str(WORKSPACE), help="the workspace folder (default: workspace/ here)")

    c = commands.add_parser("list", help="the exercises and their status in the workspace")
    c.add_argument("--workspace", **ws)
    c.set_defaults(run=cmd_list)

    c = commands.add_parser("start", help="copy the stubs into a workspace; existing files are kept")
    c.add_argument("dir", nargs="?", default=str(WORKSPACE), help="the workspace folder (default: workspace/)")
    c.add_argument("--only", nargs="+", metavar="NAME", help="only these exercises")
    c.add_argument("--force", action="store_true", help="replace existing files with fresh stubs (your work is lost)")
    c.set_defaults(run=cmd_start)

    c = commands.add_parser("check", help="run an exercise's checks on your file (exit status 0: all pass)")
    c.add_argument("name", nargs="?", help="the exercise")
    c.add_argument("--all", action="store_true", help="every exercise")
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.add_argument("--workspace", **ws)
    c.set_defaults(run=cmd_check)

    c = commands.add_parser("hint", help="the next hint of an exercise (or hint N)")
    c.add_argument("name", help="the exercise")
    c.add_argument("n", nargs="?", type=int, help="which hint (default: the next)")
    c.add_argument("--workspace", **ws)
    c.set_defaults(run=cmd_hint)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except UsageError as e:
        message = str(e)
    sys.exit(f"error: {message}")


if __name__ == "__main__":
    sys.exit(main())
