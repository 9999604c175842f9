"""`trec`: one subcommand per pipeline stage, each `trec <stage> -c cfg.yaml [key.sub=value ...]`.

This module only parses the command line, resolves the config and maps errors to exit codes; what a
stage does lives in `trecsys/stages/<stage>.py`. Stage modules are imported when their command
runs, so `trec --help` stays fast (torch is not imported for it).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import re
import signal
import sys
import threading
import traceback
from pathlib import Path

import typer

from trecsys import __version__
from trecsys.config import ExperimentConfig, load_config, to_yaml
from trecsys.errors import (
    EXIT_BUG,
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    ConfigError,
    TrecError,
    environment_error,
)
from trecsys.stage_table import DISTILL, EVALUATE, FINETUNE, PREPARE, PRETRAIN, RECOMMEND, STAGES, Stage

app = typer.Typer(
    name="trec",
    help=f"Transfer learning for recommendation: {' → '.join(s.name for s in STAGES)}.\n\n{EXIT_CODES_HELP}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ConfigOption = typer.Option(..., "--config", "-c", help="Experiment YAML file.", exists=False)
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. data.min_user_interactions=3 run_dir=runs/x")
PrintConfigOption = typer.Option(False, "--print-config", help="Print the resolved config and exit.")
DebugOption = typer.Option(False, "--debug", help="Show the full traceback on errors.")
VerifyOption = typer.Option(False, "--verify", help="Recompute the sha256 of every input artifact against its "
                            "manifest (the default checks size and mtime only).")

def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"trec {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Transfer learning for recommendation."""


def _resolve(config: Path, overrides: list[str] | None, print_config: bool) -> ExperimentConfig | None:
    cfg = load_config(config, overrides or [])
    if print_config:
        typer.echo(to_yaml(cfg), nl=False)
        return None
    return cfg


def _run_stage(stage: Stage, config: Path, overrides: list[str] | None, print_config: bool, debug: bool,
               **options) -> None:
    """Resolve the config, run `trecsys.stages.<stage>.run(cfg, **options)`, map errors to exit codes."""

    def call(cfg: ExperimentConfig) -> None:
        _check_machine(cfg)
        importlib.import_module(stage.module).run(cfg, **options)

    _guarded(call, config, overrides, print_config, debug)


class StopSignal(KeyboardInterrupt):
    """SIGTERM (or SIGINT) outside a training loop: unwind, so that every temporary file is removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stop(signum: int, frame: object) -> None:
    raise StopSignal(signum)


@contextlib.contextmanager
def _stop_signals():
    """SIGINT and SIGTERM stop any stage the same way (a training loop installs its own handler, which
    saves a checkpoint first, and puts this one back when it ends)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_machine(cfg: ExperimentConfig) -> None:
    """An asked-for accelerator must be there: checked before a stage starts (the config's own
    checks ran when it loaded; this one needs torch)."""
    if cfg.device not in ("auto", "cpu"):
        from trecsys.runtime import resolve_device

        resolve_device(cfg.device)


def _guarded(action, config: Path, overrides: list[str] | None, print_config: bool, debug: bool) -> None:
    """Resolve the config and run `action(cfg)`, turning every failure into one line and an exit code."""
    try:
        with _stop_signals():
            cfg = _resolve(config, overrides, print_config)
            if cfg is None:
                return
            action(cfg)
    except TrecError as exc:
        _fail(exc, exc.exit_code, debug)
    except KeyboardInterrupt as exc:
        name = signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
        _fail(f"stopped by {name}; what this run was writing was discarded and earlier outputs are kept",
              EXIT_INTERRUPTED, debug)
    except typer.Exit:
        raise
    except Exception as exc:
        known = environment_error(exc)  # disk full, read-only, ...: the environment, not a bug
        if known is not None:
            _fail(known, known.exit_code, debug)
        # A bug: keep the one-line promise, but let --debug show everything.
        _fail(f"internal error ({type(exc).__name__}: {exc}); re-run with --debug and report it", EXIT_BUG, debug)


def _fail(message: object, exit_code: int, debug: bool):
    if debug:
        traceback.print_exc()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(exit_code) from None


@app.command(PREPARE.name)
def prepare(
    config: Path = ConfigOption,
    overrides: list[str] = OverridesArg,
    print_config: bool = PrintConfigOption,
    debug: bool = DebugOption,
) -> None:
    """Read the raw domains, clean and split them, embed item text: writes <run_dir>/prepared/."""
    _run_stage(PREPARE, config, overrides, print_config, debug)


@app.command(PRETRAIN.name)
def pretrain_source(
    config: Path = ConfigOption,
    overrides: list[str] = OverridesArg,
    print_config: bool = PrintConfigOption,
    debug: bool = DebugOption,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted or max_steps-limited run "
                                "from <run_dir>/.pretrain.work/last/ exactly where it stopped."),
    verify: bool = VerifyOption,
) -> None:
    """Train the teacher on the source domain(s): writes <run_dir>/pretrain/."""
    _run_stage(PRETRAIN, config, overrides, print_config, debug, resume=resume, verify=verify)


@app.command(DISTILL.name)
def distill(
    config: Path = ConfigOption,
    overrides: list[str] = OverridesArg,
    print_config: bool = PrintConfigOption,
    debug: bool = DebugOption,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted or max_steps-limited run "
                                "from <run_dir>/.distill.work/last/ exactly where it stopped."),
    verify: bool = VerifyOption,
) -> None:
    """Distil a teacher checkpoint into a smaller student: writes <run_dir>/distill/."""
    _run_stage(DISTILL, config, overrides, print_config, debug, resume=resume, verify=verify)


@app.command(FINETUNE.name)
def finetune_target(
    config: Path = ConfigOption,
    overrides: list[str] = OverridesArg,
    print_config: bool = PrintConfigOption,
    debug: bool = DebugOption,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted or max_steps-limited run: "
                                "finished candidates are kept, the interrupted one continues from "
                                "<run_dir>/.finetune.work/<strategy>/last/."),
    verify: bool = VerifyOption,
) -> None:
    """Adapt a checkpoint to the target domain: writes <run_dir>/finetune/."""
    _run_stage(FINETUNE, config, overrides, print_config, debug, resume=resume, verify=verify)


@app.command(EVALUATE.name)
def evaluate(
    config: Path = ConfigOption,
    overrides: list[str] = OverridesArg,
    model: str = typer.Option(None, "--model", help="Checkpoint folder to evaluate instead of the run's latest."),
    split: str = typer.Option("test", "--split", help="Held-out split: valid or test."),
    compare: list[str] = typer.Option(
        None, "--compare",
        help="Runs or checkpoint folders to compare side by side, paired against the first "
        "(repeat the option, or give a comma list, or list paths after it).",
    ),
    print_config: bool = PrintConfigOption,
    debug: bool = DebugOption,
    verify: bool = VerifyOption,
) -> None:
    """Full-ranking metrics, slices and confidence intervals: writes <run_dir>/eval/."""
    if split not in ("valid", "test"):  # before the config, the data or torch are read
        _fail(ConfigError(f"option --split: expected 'valid' or 'test', got {split!r}"), 2, debug)
    overrides = list(overrides or [])
    if compare:
        # `--compare runs/a runs/b`: paths after the option land among the overrides. An override is
        # `dotted.key=value`; anything else (no "=", a "/" before it as in runs/lr=0.1, or an
        # existing folder) is another run to compare.
        paths = [o for o in overrides if not _is_override(o)]
        compare = [*compare, *paths]
        overrides = [o for o in overrides if o not in paths]
    _run_stage(EVALUATE, config, overrides, print_config, debug, model=model, split=split, compare=compare,
               verify=verify)


_OVERRIDE = re.compile(r"[A-Za-z_][\w\-]*(\.[A-Za-z_0-9][\w\-]*)*=")


def _is_override(token: str) -> bool:
    return bool(_OVERRIDE.match(token)) and not Path(token).is_dir()


@app.command(RECOMMEND.name, help=(
    "Top-K items per user (or per text query) to Parquet, safe to run from cron: writes "
    "<run_dir>/recommend/date=YYYY-MM-DD/recommendations.parquet, or --output.\n\n"
    "Knobs in the config's recommend: section (k, exclude_seen, category filters, diversity, fusion) "
    "and the search: section for --query.\n\n"
    f"{EXIT_CODES_HELP} A run that exits non-zero leaves the previous output in place."
))
def recommend(
    config: Path = ConfigOption,
    overrides: list[str] = OverridesArg,
    model: str = typer.Option(None, "--model", help="Checkpoint folder to use instead of the run's latest."),
    users: str = typer.Option(None, "--users", help="Users to recommend for: ids one per line, or a Parquet "
                              "file with a user_id column (default: every user of the domain)."),
    histories: str = typer.Option(None, "--histories", help="New users' histories: JSONL {user_id, item_ids, "
                                  "texts} or Parquet (user_id, item_id[, text]); new items need their text."),
    query: list[str] = typer.Option(None, "--query", help="Rank the items that match this text (repeatable); "
                                    "recommend.query_mode=follows ranks what follows it instead."),
    queries: str = typer.Option(None, "--queries", help="File of queries, one per line, ranked in batches."),
    user: str = typer.Option(None, "--user", help="With --query: order the matching items by this user's "
                             "history (follows mode: blend it in) and skip their seen items."),
    output: str = typer.Option(None, "--output", "-o", help="A .parquet file, or a folder that gets "
                               "date=YYYY-MM-DD/recommendations.parquet."),
    wait: float = typer.Option(0.0, "--wait", min=0.0, help="Seconds to wait for another run on the same output "
                               "before giving up with exit code 3."),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 2) on unknown user ids instead of listing "
                                "them beside the output."),
    show: int = typer.Option(None, "--show", min=0, help="Print the first N lists with item titles."),
    as_of: str = typer.Option(None, "--as-of", help="valid or test: recommend as of that split, as `trec "
                              "evaluate --split` ranks: histories up to and excluding it, baselines counted "
                              "on the train split; for offline scoring of the lists."),
    print_config: bool = PrintConfigOption,
    debug: bool = DebugOption,
    verify: bool = VerifyOption,
) -> None:
    _run_stage(RECOMMEND, config, overrides, print_config, debug, model=model, users=users, histories=histories,
               query=query, queries=queries, user=user, output=output, wait=wait, strict=strict, show=show,
               as_of=as_of, verify=verify)


@app.command("run", help=(
    f"Run the pipeline in order: {', '.join(s.name for s in STAGES)}. "
    "A stage whose outputs are up to date with its config section and its inputs is skipped; each "
    "skip and run is printed with its reason. Records what it made in <run_dir>/pipeline.json.\n\n"
    f"{EXIT_CODES_HELP} The exit code is the failing stage's."
))
def run_pipeline(
    config: Path = ConfigOption,
    overrides: list[str] = OverridesArg,
    stages: str = typer.Option(None, "--stages", help="Comma list of the stages to consider, e.g. evaluate,recommend."),
    force: bool = typer.Option(False, "--force", help="Run the selected stages even when up to date."),
    show: int = typer.Option(3, "--show", min=0, help="Recommendation lists to print, with item titles."),
    print_config: bool = PrintConfigOption,
    debug: bool = DebugOption,
) -> None:
    def call(cfg: ExperimentConfig) -> None:
        _check_machine(cfg)
        from trecsys import pipeline

        pipeline.run(cfg, stages=stages, force=force, show=show)

    _guarded(call, config, overrides, print_config, debug)


def example_configs() -> dict[str, str]:
    """The example configs shipped in the package (trecsys/configs links to configs/): name -> the
    first sentence of the file's leading comment."""
    folder = importlib.resources.files("trecsys") / "configs"
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            comment = []
            for line in entry.read_text(encoding="utf-8").splitlines():
                if not line.startswith("#") or not line.strip("# "):
                    break
                comment.append(line.strip("# "))
            text = " ".join(comment)
            found[entry.name[: -len(".yaml")]] = text.split(". ", 1)[0].removesuffix(".")
    return found


@app.command("configs")
def list_configs() -> None:
    """List the example configs that `trec init NAME DIR` copies out."""
    for name, summary in example_configs().items():
        typer.echo(f"{name:<18} {summary}")


@app.command("init")
def init_config(
    name: str = typer.Argument(..., help="An example config, as `trec configs` lists it (e.g. demo)."),
    directory: Path = typer.Argument(Path("."), help="Folder to copy NAME.yaml into (created if needed)."),
    force: bool = typer.Option(False, "--force", help="Overwrite DIR/NAME.yaml if it exists."),
) -> None:
    """Copy an example config into DIR, to edit and run: `trec init demo exp && trec run -c exp/demo.yaml`."""
    try:
        known = example_configs()
        name = name.removesuffix(".yaml")
        if name not in known:
            raise ConfigError(f"no example config named {name!r}; `trec configs` lists: {', '.join(known)}")
        target = directory / f"{name}.yaml"
        if target.exists() and not force:
            raise ConfigError(f"{target} exists; pass --force to overwrite it")
        if directory.exists() and not directory.is_dir():
            raise ConfigError(f"{directory} is a file, not a folder")
        directory.mkdir(parents=True, exist_ok=True)
        text = (importlib.resources.files("trecsys") / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
        from trecsys.artifacts import write_text  # pyarrow: only when a file is written

        write_text(target, text)
    except TrecError as exc:
        _fail(exc, exc.exit_code, False)
    typer.echo(str(target))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover - Ctrl-C while Typer parses
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
