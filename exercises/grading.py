"""
Grading: load a learner's file, run an exercise's checks on it and report each check the way the `cmp` helper of
Karpathy's backprop exercise does (nn-zero-to-hero, lecture 5, "Building makemore Part 4": exact / approximate /
max difference), with the relative error CS231n's assignments print, max |a - b| / max(1e-8, |a| + |b|).

A check (checks.py) is two calls on the same seeded inputs: the learner's function and the project's own function.
Numbers are compared as float64 tensors (shape first, then values); words and keys (bpe, key_remap) must be equal.
Errors in the learner's code become one line naming the file and line; nothing here prints a traceback.
"""
import importlib.util
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch


class Failure(Exception):
    """A check that fails with a message of its own, e.g. "no gradient reached self.ctx"."""


class LoadError(Exception):
    """A learner's file that cannot be used: missing, a syntax error, a failing import, a function missing."""


@dataclass
class Check:
    name: str  # what is checked, shown on its line
    learner: callable  # () -> what the learner's code gives
    reference: callable  # () -> what the project's code gives on the same inputs
    atol: float = 1e-5  # approximate: |a - b| <= atol + rtol * |b| everywhere (torch.allclose)
    rtol: float = 1e-4
    bonus: bool = False  # shown, but not needed for "passes"


@dataclass
class Result:
    name: str
    passed: bool
    exact: bool = False
    maxdiff: float = None  # None for word-by-word comparisons and failures before any number was compared
    relerr: float = None
    message: str = ""
    bonus: bool = False
    not_implemented: bool = False


@dataclass
class Report:
    exercise: str
    file: str
    status: str  # "not started", "fails", "passes" or "missing"
    results: list = field(default_factory=list)
    error: str = ""  # why the file could not be used


# -----------------------------------------------------------------------------
# Comparing a result with the reference


def shape_words(t):
    return "a scalar (shape ())" if t.dim() == 0 else f"shape {tuple(t.shape)}"


def as_float64(x, want):
    """The learner's result as a float64 tensor; anything else (None, a string) is a Failure naming what was due."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    try:
        return torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise Failure(f"returned {type(x).__name__}, expected a tensor of {shape_words(want)}") from None


def flatten(x, want, where="the result"):
    """A nested dict of numbers (recall_at_k's) -> a list of its numbers in the reference's key order."""
    if not isinstance(want, dict):
        return [x]
    if not isinstance(x, dict):
        raise Failure(f"{where} is a {type(x).__name__}, expected a dict with keys {list(want)}")
    missing = [k for k in want if k not in x]
    if missing:
        raise Failure(f"{where} has no key {missing[0]!r} (expected keys {list(want)}, found {list(x)})")
    return [v for k in want for v in flatten(x[k], want[k], f"{where}[{k!r}]")]


def compare_words(got, want):
    """Reference {input: output} with words or tuples of words: every output must be equal."""
    wrong = [k for k in want if got.get(k) != want[k]]
    message = f"{len(want) - len(wrong)} of {len(want)} match"
    if wrong:
        k = wrong[0]
        message += f"; e.g. {k!r}: got {got.get(k)!r}, expected {want[k]!r}"
    return dict(passed=not wrong, exact=not wrong, message=message)


def compare(got, want, atol, rtol):
    """Like `cmp`: exact (bit for bit), approximate (torch.allclose) and the max difference; plus CS231n's rel err."""
    if isinstance(want, dict) and any(isinstance(v, (str, tuple)) for v in want.values()):
        return compare_words(got, want)
    if isinstance(want, dict):
        got, want = flatten(got, want), flatten(want, want)
    want = torch.as_tensor(want, dtype=torch.float64) if not isinstance(want, torch.Tensor) else want.detach().double()
    got = as_float64(got, want)
    if got.shape != want.shape:
        raise Failure(f"returned {shape_words(got)}, expected {shape_words(want)}")
    if not torch.isfinite(got).all():
        raise Failure("returned NaN or inf values")
    diff = (got - want).abs()
    maxdiff = diff.max().item() if diff.numel() else 0.0
    relerr = (diff / (got.abs() + want.abs()).clamp_min(1e-8)).max().item() if diff.numel() else 0.0
    return dict(passed=torch.allclose(got, want, rtol=rtol, atol=atol), exact=torch.equal(got, want),
                maxdiff=maxdiff, relerr=relerr)


# -----------------------------------------------------------------------------
# Running the learner's code


def shown(path):
    """A path as the learner typed it: relative to the current folder where possible."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def first_line(e):
    return (str(e).strip().splitlines() or [""])[0][:200]


def where(e, learner_file):
    """' (clip_loss.py line 23)': the last line of the learner's file in the traceback, if it is there."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if learner_file and f.filename == learner_file]
    return f" ({Path(frames[-1].filename).name} line {frames[-1].lineno})" if frames else ""


def run_check(check, learner_file=None):
    want = check.reference()  # the project's code: an error here is a bug in the checker, and shows as one
    result = Result(check.name, False, bonus=check.bonus)
    try:
        for key, value in compare(check.learner(), want, check.atol, check.rtol).items():
            setattr(result, key, value)
    except NotImplementedError:
        result.message, result.not_implemented = "not implemented yet", True
    except Failure as e:
        result.message = str(e)
    except Exception as e:  # the learner's code raised: one line, where it happened
        result.message = f"your code raised {type(e).__name__}: {first_line(e)}{where(e, learner_file)}"
    return result


@contextmanager
def forbidden(calls, learner_file):
    """Within the block, each (module, name, advice) in calls refuses calls made from the learner's file (a Failure
    with the advice); the project's own code may still use it. E.g. attention: no F.scaled_dot_product_attention."""
    def guard(original, advice):
        def refuse(*args, **kwargs):
            if learner_file and sys._getframe(1).f_code.co_filename == learner_file:
                raise Failure(advice)
            return original(*args, **kwargs)
        return refuse
    saved = [(module, name, getattr(module, name)) for module, name, _ in calls]
    for (module, name, original), (_, _, advice) in zip(saved, calls):
        setattr(module, name, guard(original, advice))
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def load_learner(path, functions):
    """The learner's file as a module holding `functions`; a LoadError (one line) when it cannot be used."""
    path = Path(path).resolve()
    if not path.is_file():
        raise LoadError(f"{shown(path)} not found")
    spec = importlib.util.spec_from_file_location(f"learner_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise LoadError(f"{shown(e.filename or path)}, line {e.lineno}: {e.msg}") from None
    except Exception as e:
        raise LoadError(f"importing {shown(path)} raised {type(e).__name__}: {first_line(e)}"
                        f"{where(e, str(path))}") from None
    for name in functions:
        if not callable(getattr(module, name, None)):
            raise LoadError(f"{shown(path)} defines no function {name}() (keep the stub's function names)")
    return module


def status_of(results):
    if results and all(r.not_implemented for r in results):
        return "not started"
    return "passes" if all(r.passed for r in results if not r.bonus) else "fails"


def grade_module(exercise, module, learner_file=None):
    """Runs every check of `exercise` on `module` (the learner's functions as attributes) -> [Result]."""
    checks = exercise.checks(module)
    with forbidden(exercise.forbid, learner_file):
        return [run_check(c, learner_file) for c in checks]


def grade(exercise, path):
    """The Report of the learner's file at path."""
    if not Path(path).is_file():
        return Report(exercise.name, shown(path), "missing", error=f"{shown(path)} not found: python exercises.py "
                      f"start {shown(Path(path).parent)} copies the missing stubs")
    try:
        module = load_learner(path, exercise.functions)
    except LoadError as e:
        return Report(exercise.name, shown(path), "fails", error=str(e))
    results = grade_module(exercise, module, str(Path(path).resolve()))
    return Report(exercise.name, shown(path), status_of(results), results)


# -----------------------------------------------------------------------------
# Printing


def yes(flag):
    return "yes" if flag else "no"


def format_result(r, width):
    line = f"  {'PASS' if r.passed else 'FAIL'}  {r.name + (' (bonus)' if r.bonus else ''):{width}s} | "
    if r.maxdiff is None:
        return line + r.message
    return line + (f"exact: {yes(r.exact):3s} | approximate: {yes(r.passed):3s} | maxdiff: {r.maxdiff:.1e} | "
                   f"rel err: {r.relerr:.1e}")


def format_report(report, solution):
    """The report as lines of text; solution names the project's function(s) the checks compared with."""
    head = f"{report.exercise} ({report.file})"
    if report.error:
        return f"{head}: {report.status}: {report.error}"
    if report.status == "not started":
        return f"{head}: not started (the stub raises NotImplementedError)"
    width = max(len(r.name) + 8 * r.bonus for r in report.results)
    required = [r for r in report.results if not r.bonus]
    bonus = [r for r in report.results if r.bonus]
    lines = [f"{head}, compared with {solution}:"] + [format_result(r, width) for r in report.results]
    summary = f"  {report.exercise} {report.status}: {sum(r.passed for r in required)} of {len(required)} checks"
    if bonus:
        summary += f" (bonus: {sum(r.passed for r in bonus)} of {len(bonus)})"
    return "\n".join(lines + [summary])


def report_dict(report):
    """The report as plain JSON-ready data (check --json)."""
    checks = [{k: getattr(r, k) for k in ("name", "passed", "bonus", "exact", "maxdiff", "relerr", "message")}
              for r in report.results]
    return {"exercise": report.exercise, "file": report.file, "status": report.status, "error": report.error,
            "checks": checks}
