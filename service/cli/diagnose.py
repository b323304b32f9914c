"""`gradhealth diagnose MODEL --batch BATCH`: one diagnosis in-process (CONTRACT.md §2).

Exit codes: 0 no finding at or above `--fail-on`; 1 at least one; 2 bad input or usage (one
line on stderr naming the problem); 3 internal failure. Never a traceback for the user.
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli import app

EXIT_OK, EXIT_FINDINGS, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
_SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"gradhealth: {message}", err=True)
    return typer.Exit(code)


@app.command("diagnose")
def diagnose_command(
    model: Annotated[Path, typer.Argument(help="ONNX, TorchScript or torch.export (.pt2) file")],
    batch: Annotated[Path, typer.Option("--batch", help=".npz, .safetensors or .pt sample batch")],
    loss: Annotated[
        str | None,
        typer.Option(help="cross_entropy|nll|mse|l1|bce_with_logits|bce|output_norm|model_output"),
    ] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:N")] = "auto",
    mode: Annotated[str, typer.Option(help="train|eval")] = "train",
    precision: Annotated[str, typer.Option(help="fp32|bf16|fp16 (autocast)")] = "fp32",
    micro_batches: Annotated[int, typer.Option(help="split the batch, accumulate gradients")] = 1,
    verify: Annotated[bool, typer.Option(help="try automatic fixes on a copy")] = True,
    dropout: Annotated[
        bool, typer.Option(help="train mode: keep dropout and random masks (seeded)")
    ] = False,
    output_format: Annotated[str, typer.Option("--format", help="table|json")] = "table",
    fail_on: Annotated[str, typer.Option(help="warning|error")] = "error",
) -> None:
    """Measure gradient health layer by layer and say how to fix what is wrong."""
    if output_format not in ("table", "json"):
        raise _fail(f"--format must be table or json, not {output_format!r}", EXIT_BAD_INPUT)
    if fail_on not in ("warning", "error"):
        raise _fail(f"--fail-on must be warning or error, not {fail_on!r}", EXIT_BAD_INPUT)
    for path, what in ((model, "model"), (batch, "batch")):
        if not path.is_file():
            raise _fail(f"the {what} file {str(path)!r} does not exist", EXIT_BAD_INPUT)
    try:
        report = _run(model, batch, loss, device, mode, precision, micro_batches, verify, dropout)
    except typer.Exit:
        raise
    except Exception as exc:
        raise _classify(exc) from None
    if output_format == "json":
        sys.stdout.write(json.dumps(report.to_jsonable()) + "\n")
    else:
        print_report(report)
    threshold = _SEVERITY_RANK[fail_on]
    failing = any(_SEVERITY_RANK[f.severity] >= threshold for f in report.findings)
    raise typer.Exit(EXIT_FINDINGS if failing else EXIT_OK)


def _run(
    model: Path,
    batch: Path,
    loss: str | None,
    device: str,
    mode: str,
    precision: str,
    micro_batches: int,
    verify: bool,
    dropout: bool = False,
) -> Any:
    from pydantic import ValidationError

    from service.engine.options import DiagnoseOptions

    try:
        options = DiagnoseOptions.model_validate(
            {
                "loss": loss,
                "device": device,
                "mode": mode,
                "precision": precision,
                "micro_batches": micro_batches,
                "verify_fixes": verify,
                "dropout": dropout,
            }
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise _fail(f"--{field.replace('_', '-')}: {error['msg']}", EXIT_BAD_INPUT) from None
    from service.engine.pipeline import diagnose  # torch is imported only from here on

    quiet_torch_logs()
    # external data that torch.onnx.export wrote next to the model (`model.onnx.data`) is read
    # from the model's folder, under loading.py's rules (no absolute paths, `..` or links out)
    return diagnose(model, batch, options, bundle_dir=model.absolute().parent)


# torch loggers that report, with a traceback per op, failures torch itself recovers from or
# that reach the user anyway as the exception gradhealth turns into its one-line message
# (fake_tensor: "failed while attempting to run meta for aten.mm.default" when a TorchScript
# model is converted for a batch that does not fit it)
NOISY_TORCH_LOGGERS = ("torch._subclasses.fake_tensor",)


def _drop_record(_record: logging.LogRecord) -> bool:
    return False


def quiet_torch_logs() -> None:
    """Silence NOISY_TORCH_LOGGERS in this process (a filter: torch may reset their levels)."""
    for name in NOISY_TORCH_LOGGERS:
        logger = logging.getLogger(name)
        if _drop_record not in logger.filters:
            logger.addFilter(_drop_record)


def _classify(exc: Exception) -> typer.Exit:
    from service.errors import GradhealthError

    if isinstance(exc, GradhealthError):
        return _fail(exc.message, EXIT_BAD_INPUT if exc.is_client_error else EXIT_INTERNAL)
    if isinstance(exc, MemoryError):
        return _fail("out of memory: try --micro-batches or a smaller batch", EXIT_INTERNAL)
    text = str(exc).splitlines()[0] if str(exc) else ""
    return _fail(f"internal error ({type(exc).__name__}: {text})", EXIT_INTERNAL)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _verified_label(rec: Any) -> str:
    """What trying the fix on a copy showed: resolved, tried without resolving, or why not tried."""
    verified = rec.verified
    if verified is None:
        return ""
    if not verified.applied:
        return f" (not tried on a copy: {verified.reason})" if verified.reason else ""
    if verified.resolved:
        return " (verified on a copy: resolved)"
    if verified.resolved is False:
        return " (tried on a copy: not resolved)"
    return f" (tried on a copy: {verified.reason})" if verified.reason else " (tried on a copy)"


def _addressed(rec: Any, findings: list[Any]) -> str:
    """`→ #0 vanishing_gradients`: which numbered findings a fix answers."""
    parts = []
    for ref in rec.addresses:
        if isinstance(ref, int) and 0 <= ref < len(findings):
            parts.append(f"#{ref} {findings[ref].kind}")
        else:
            parts.append(str(ref))
    return f" → {', '.join(parts)}" if parts else ""


def _layer_list(names: list[str], shown: int = 5) -> str:
    more = f", … +{len(names) - shown} more" if len(names) > shown else ""
    return f" [{', '.join(names[:shown])}{more}]" if names else ""


def _quantizer_table(quantizers: list[Any]) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="fake quantisers (execution order)")
    for column in ("quantiser", "quantises", "range", "batch min", "batch max", "clipped"):
        table.add_column(column, justify="right" if column.startswith(("b", "c")) else "left")
    for q in quantizers:
        what = ", ".join(q.parameters[:2]) if q.quantizes == "weight" else (q.layer or q.input)
        span = f"[{_fmt(q.range_min)}, {_fmt(q.range_max)}]" + (" ch" if q.per_channel else "")
        table.add_row(
            Text(q.name),
            Text(f"{q.quantizes} {what}"),
            Text(span),
            _fmt(q.input_min),
            _fmt(q.input_max),
            _fmt(q.clipped_fraction),
        )
    return table


def print_report(report: Any) -> None:
    """The report as rich tables on stdout (also used by `gradhealth submit`)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    # not a terminal (pipes, CI logs): wide enough that the layer table is not truncated
    console = Console(width=None if sys.stdout.isatty() else 160)

    def print_indented(text: str) -> None:
        # wrapped lines of a long message stay under their heading, without rich's padding to
        # the full width; no markup, so names like [layers.0] print as they are
        width = max(console.width - 1, 40)
        wrapped = textwrap.fill(text, width, initial_indent="   ", subsequent_indent="   ")
        console.print(wrapped, markup=False, highlight=False, soft_wrap=True)

    colour = {"healthy": "green", "at_risk": "yellow", "unhealthy": "red"}[report.verdict]
    console.print(
        f"[bold {colour}]{report.verdict}[/]  {report.model.format} model, "
        f"{report.model.parameter_count:,} parameters, batch {report.batch.size}, "
        f"loss {escape(report.loss.kind)} = {_fmt(report.loss.value)}, {escape(report.device)}, "
        f"{report.mode}, {report.precision}"
    )
    conversion = report.model.conversion
    if conversion is not None:
        if conversion.checked:
            line = (
                f"ONNX conversion vs {conversion.reference or 'onnxruntime'}: max abs error "
                f"{_fmt(conversion.max_abs_error)}, max rel error {_fmt(conversion.max_rel_error)}"
            )
            if conversion.reason:  # what the comparison had to allow for
                line += f" ({conversion.reason})"
        else:
            line = f"ONNX conversion not checked against onnxruntime: {conversion.reason}"
        console.print(line, markup=False, highlight=False)
    if report.model.probe_coverage != "full":
        reason = escape(report.model.probe_coverage_reason or "")
        console.print(f"[yellow]probes: parameters only[/] ({reason})")
    table = Table(title="layers (input → output)")
    for column in ("depth", "layer", "op", "act", "‖∂L/∂a‖", "‖∇W‖", "‖∇W‖/‖W‖"):
        table.add_column(column, justify="right" if column.startswith(("d", "‖")) else "left")
    for column in ("saturated", "dead", "init/ref"):
        table.add_column(column, justify="right")
    for layer in report.layers:
        stats = layer.activation_stats
        table.add_row(
            str(layer.depth),
            Text(layer.name),
            Text(layer.op),
            Text(stats.activation or ""),
            _fmt(layer.activation_grad_norm),
            _fmt(layer.grad_norm),
            _fmt(layer.grad_to_weight),
            _fmt(stats.saturated_fraction),
            _fmt(stats.dead_fraction),
            _fmt(layer.init_std_ratio),
        )
    console.print(table)
    if report.quantizers:
        console.print(_quantizer_table(report.quantizers))
    depth = report.profiles.depth
    if depth.growth_factor is not None:
        console.print(
            f"depth profile: ‖∂L/∂a‖ grows ×{_fmt(depth.growth_factor)} per layer towards the "
            f"output; first/last = {_fmt(depth.first_last_ratio)}",
            highlight=False,
        )
    for profile in report.profiles.time:
        tensor = profile.tensor or f"∂L/∂{profile.input}"
        console.print(
            f"time profile ({profile.input}, axis {profile.axis}): {tensor} grows "
            f"×{_fmt(profile.growth_factor)} per step towards the last step; first/last = "
            f"{_fmt(profile.first_last_ratio)}"
            + (
                f" (the last {profile.unreached_last_steps} step(s) get no gradient: the loss "
                "does not read them, a next-token target's last position)"
                if profile.unreached_last_steps
                else ""
            ),
            markup=False,
            highlight=False,
        )
    if not report.findings:
        console.print("[green]no findings[/]")
    for index, finding in enumerate(report.findings):
        sev = {"info": "blue", "warning": "yellow", "error": "red"}[finding.severity]
        heading = Text(f"#{index} {finding.severity} {finding.kind}", style=sev)
        heading.append(f"{_layer_list(finding.layers)}:")
        console.print(heading)
        print_indented(finding.message)
    for rank, rec in enumerate(report.recommendations, start=1):
        heading = Text(f"fix {rank}: {rec.fix}", style="bold")
        heading.append(f"{_addressed(rec, report.findings)}{_verified_label(rec)}")
        console.print(heading)
        print_indented(rec.rationale)
    for note in report.notes:
        # what the engine adjusted or could not do (folded BatchNorm, micro-batch splits, ...)
        console.print(Text("note:", style="dim"))
        print_indented(note)
