"""The `aligndistil` command line: one thin command per stage.

Each stage command is generated from its config dataclass, so every flag has
the same name and help text as the config field (and the YAML key) it sets.
Errors become one line on stderr with exit code 1 (2 for usage errors); a
traceback only with --debug. Results go to stdout, progress to stderr.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, List, Literal, Optional

import typer
from typer.core import TyperCommand

try:  # typer >= 0.20 vendors its own click; its exceptions are not the installed click's.
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_errors

from aligndistil_cli import __version__
from aligndistil_cli.config.files import field_types, load_config
from aligndistil_cli.config.groups import INPUTS
from aligndistil_cli.core.console import say_last, stderr
from aligndistil_cli.core.errors import UsageError, UserError
from aligndistil_cli.stages import STAGES

app = typer.Typer(
    name="aligndistil",
    help="Token-level alignment with AlignDistil (Zhang et al., ACL 2025, arXiv 2503.02832).\n\n"
    "Stages read and write self-describing directories; `aligndistil run pipelines/tiny.yaml` chains them.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def emit(text: str) -> None:
    """Results on stdout, verbatim: no markup, no wrapping, so $(aligndistil ...) captures a path."""
    print(text, flush=True)

_CLI_TYPES = {str: str, int: int, float: float, bool: bool, dict: List[str]}


def _parse_named_paths(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--{flag} expects NAME=PATH, got {value!r}")
        out[name] = path
    return out


def _parameter(f: dataclasses.Field, tp: type) -> inspect.Parameter:
    """The option of a config field: its flag and TRL's names for it, its panel, its choices (listed and completed)."""
    flag = f.metadata.get("flag") or f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else None
    shown = "" if default in (None, "") or tp is dict else f" [default: {default}]"
    aliases = [f"--{a.replace('_', '-')}" for a in f.metadata.get("aliases", ())]
    decls = [f"--{flag}/--no-{flag}"] if tp is bool else [f"--{flag}", *aliases]
    choices = f.metadata.get("choices")
    metavar = f"[{'|'.join(choices)}]" if choices else None
    if metavar and len(metavar) > 48:  # a longer one would push its line past 80 columns: listed in the help
        metavar, shown = "[CHOICE]", f" One of: {', '.join(choices)}.{shown}"
    option = typer.Option(*decls, help=f.metadata.get("help", "") + shown, show_default=False,
                          rich_help_panel=f.metadata.get("panel"), metavar=metavar)
    kind = Literal[choices] if choices else _CLI_TYPES[tp]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], option])


class PanelCommand(TyperCommand):
    """Plain help (rich stays unimported, so --help is fast) with the options in their groups' panels, in the
    order of the stage's groups: inputs first."""

    def format_options(self, ctx, formatter) -> None:
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Other options", []).append(record)
        for title, rows in panels.items():
            with formatter.section(title):
                formatter.write_dl(rows)


def _shell_lines(command: str, width: int = 76) -> str:
    """A long example command as shell lines continued with a backslash, each within width columns."""
    lines, line = [], " "
    for word in command.split():
        if len(line) + len(word) + 3 > width:
            lines.append(line + " \\")
            line = "   "
        line += " " + word
    return "\n".join([*lines, line])


def stage_command(name: str, fixed: dict[str, Any] | None = None) -> None:
    """Register `aligndistil NAME` with one option per config field plus --config."""
    stage = STAGES[name]
    types = field_types(stage.config)
    fields = [f for f in dataclasses.fields(stage.config) if f.name not in (fixed or {})]

    def command(**kwargs: Any) -> None:
        config_file, ignore_unknown = kwargs.pop("config_file"), kwargs.pop("ignore_unknown_keys")
        for f in fields:
            if types[f.name] is dict and kwargs.get(f.name) is not None:
                kwargs[f.name] = _parse_named_paths(kwargs[f.name], f.metadata.get("flag") or f.name) or None
        config = load_config(stage.config, config_file, {**kwargs, **(fixed or {})}, bool(ignore_unknown))
        from aligndistil_cli.parallel import distributed
        from aligndistil_cli.train.checkpoint import input_fingerprints

        def inputs() -> dict[str, str]:  # {path: fingerprint}, what every rank must see alike
            return {i["path"]: i["fingerprint"] for i in input_fingerprints(config).values()}

        with distributed.session(config, inputs):
            main = distributed.is_main()
            stderr.quiet = not main
            out = stage.run(config)
        if main:
            emit(str(out))
            if stage.report:
                say_last(f"report: {Path(out) / stage.report}")

    config_params = [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[Path], typer.Option("--config", help="YAML file of config keys (TRL's names too); flags win.",
                                         rich_help_panel=INPUTS)]),
        inspect.Parameter("ignore_unknown_keys", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option("--ignore-unknown-keys", help="Run a --config file that has keys only TRL knows "
                               "(e.g. a TRL DPOConfig YAML) without them; they are listed.", rich_help_panel=INPUTS)]),
    ]
    command.__signature__ = inspect.Signature(config_params + [_parameter(f, types[f.name]) for f in fields])
    # "\\b" stops click from re-wrapping the example line.
    command.__doc__ = f"{stage.summary}\n\n\b\nExample:\n{_shell_lines(stage.example)}"
    app.command(name, help=command.__doc__, cls=PanelCommand)(command)


for _name in STAGES:
    stage_command(_name, {"reverse": True} if _name == "train-reverse-dpo" else None)


def _not_under_torchrun(command: str) -> None:
    """`run` and `sweep` start stages themselves; under torchrun every rank would run (and write) each stage alone."""
    from aligndistil_cli.parallel import distributed

    if distributed.launched():
        raise UsageError(f"do not start `aligndistil {command}` with torchrun; "
                         "`aligndistil run PIPELINE --nproc-per-node N` launches each stage on N processes itself")


# Shared by `run` and `sweep`, so the two commands word these flags identically.
ForceOption = Annotated[bool, typer.Option("--force", help="Rerun stages even when their output is complete.")]
RootOption = Annotated[Optional[Path], typer.Option("--root", help="Write under this directory instead of the file's root.")]


@app.command("run", help="Run a pipeline file's stages in order, skipping complete ones.\n\n"
                         "\b\nExamples:\n  aligndistil run pipelines/tiny.yaml\n"
                         "  aligndistil run pipelines/tiny.yaml --dry-run --from dpo --set dpo.lr=1e-4")
def run_pipeline(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file, e.g. pipelines/tiny.yaml.")],
    force: ForceOption = False,
    root: RootOption = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(
        "--nproc-per-node", min=1, help="Run each stage on this many processes (GPUs) via torchrun "
        "[default: the file's nproc_per_node, else 1].")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print each stage, whether it would run or be "
                                          "skipped, and why; run nothing.")] = False,
    only: Annotated[Optional[List[str]], typer.Option("--only", metavar="NAME",
                                                      help="Run only this stage (repeat the flag for more).")] = None,
    start: Annotated[Optional[str], typer.Option("--from", metavar="NAME",
                                                 help="Start at this stage; earlier ones are not run.")] = None,
    until: Annotated[Optional[str], typer.Option("--until", metavar="NAME",
                                                 help="Stop after this stage.")] = None,
    sets: Annotated[Optional[List[str]], typer.Option("--set", metavar="STAGE.KEY=VALUE",
                                                      help="Override a stage's config key (repeatable), "
                                                      "e.g. --set dpo.lr=1e-4.")] = None,
) -> None:
    from aligndistil_cli.orchestrate.pipeline import run_file

    _not_under_torchrun("run")
    run_file(pipeline, force=force, root=root, nproc=nproc_per_node, dry_run=dry_run, only=only, start=start,
             until=until, sets=sets)


@app.command("sweep", help="Run a sweep (seeds x methods x knob values), reusing finished runs; "
                           "writes ROOT/summary.md.\n\n\b\nExample:\n  aligndistil sweep pipelines/experiments.yaml")
def sweep_command(
    spec: Annotated[Path, typer.Argument(help="Sweep spec YAML, e.g. pipelines/experiments.yaml.")],
    force: ForceOption = False,
    root: RootOption = None,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Seeds run at once, each in a process of its own "
                                      "(one per core, with OMP_NUM_THREADS=1).")] = 1,
) -> None:
    from aligndistil_cli.orchestrate.sweep import run_sweep

    _not_under_torchrun("sweep")
    emit(str(run_sweep(spec, root=root, force=force, jobs=jobs)))


@app.command("results", help="Write the published numbers from a finished sweep and the default run: "
                             "docs/results/summary.json, docs/frontier.png and the results blocks of docs/RESULTS.md "
                             "and README.md.\n\n\b\nExample:\n  aligndistil results")
def results_command(
    spec: Annotated[Path, typer.Option("--spec", help="The sweep's spec (its summary options).")] =
        Path("pipelines/experiments.yaml"),
    root: Annotated[Path, typer.Option("--root", help="The sweep's root.")] = Path("runs/experiments"),
    default: Annotated[Path, typer.Option("--default", help="The default run's evaluation.")] = Path("runs/tiny/eval"),
    docs: Annotated[Path, typer.Option("--docs", help="The docs directory (RESULTS.md).")] = Path("docs"),
    readme: Annotated[Path, typer.Option("--readme", help="The README with the headline block.")] = Path("README.md"),
) -> None:
    from aligndistil_cli.orchestrate.results import publish

    emit(str(publish(root, spec, default, docs, readme)))


@app.command("verify", help="Check every file of an output directory against its manifest's sha256.\n\n"
                            "\b\nExample:\n  aligndistil verify runs/tiny/teacher")
def verify(directory: Annotated[Path, typer.Argument(help="A stage's output directory.")]) -> None:
    from aligndistil_cli.rundir.artifacts import verify_full

    problems = verify_full(directory)
    if problems:
        raise UserError(f"{directory}: " + "; ".join(problems))
    emit(f"{directory}: ok")


def _print_version(value: bool) -> None:
    if value:
        emit(__version__)
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                          callback=_print_version)] = False,
) -> None:
    """Options that apply to every command."""


# Options users of other tools reach for, per command ("*": any), and what this tool calls them.
MEANT = {
    ("distill", "--model"): "--student",
    ("precompute", "--model"): "--dpo and --rev",
    ("train-dpo", "--ref-model"): "--model (the reference, also the policy's start)",
    ("*", "--per-device-train-batch-size"): "--batch-size, the global batch: per-device size x --grad-accum x "
                                            "processes",
}


def _no_such_option(e: click_errors.NoSuchOption) -> str:
    """click's unknown-option error, with the option meant: --learning_rate is --learning-rate."""
    command = e.ctx.command if e.ctx else None
    name = e.option_name.replace("_", "-")
    known = [o for p in getattr(command, "params", ()) for o in (*p.opts, *p.secondary_opts)]
    meant = MEANT.get((getattr(command, "name", ""), name)) or MEANT.get(("*", name))
    if meant is None and name in known:
        meant = name
    if meant is None:
        import difflib

        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        meant = close[0] if close else None
    return f"no such option: {e.option_name}" + (f"; did you mean {meant}?" if meant else "")


def internal_error_line(e: Exception) -> str:
    """The one line an unexpected exception becomes; a full disk is said in plain words."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on device{f' (writing {e.filename})' if e.filename else ''}"
    return f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with --debug)"


INTERRUPTED = 130


def _interrupted() -> None:
    from aligndistil_cli.train.checkpoint import last_saved

    saved = last_saved()
    _fail("interrupted; " + (f"the last checkpoint is {saved} (rerun with --resume to continue from it)"
                             if saved else "no checkpoint was written"), INTERRUPTED)


def _fail(message: str, code: int) -> None:
    stderr.quiet = False  # other ranks are quiet while a stage runs, but not about why they stop
    stderr.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one-line errors and exit codes live here and only here."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        code = app(args=args, prog_name="aligndistil", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        stderr.print(e.format_message(), markup=False, highlight=False)
        sys.exit(2)
    except click_errors.NoSuchOption as e:
        if debug:
            raise
        _fail(_no_such_option(e), 2)
    except click_errors.ClickException as e:
        if debug:
            raise
        _fail(e.format_message().replace("\n", " "), 2)
    except UserError as e:
        if debug:
            raise
        if getattr(e, "said_elsewhere", False):  # rank 0 of this torchrun prints the same refusal
            sys.exit(e.exit_code)
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:  # noqa: BLE001 - the one place internal errors are turned into a line
        if debug:
            raise
        _fail(internal_error_line(e), 1)
    if code == INTERRUPTED:  # Typer turns Ctrl-C into Exit(130) before it could reach the handler above
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
