"""`gradhealth submit MODEL --batch BATCH [--server URL] [--wait]`: the client for pipelines.

Uploads the model and the batch in one request (`POST /v1/diagnoses:run`, streamed from the
files; an ONNX model whose weights sit in external data files beside it goes as a zip bundle of
the .onnx and those files, which the API takes), then either prints the diagnosis id (without
`--wait`) or polls it with a progress display on stderr and prints the report like `gradhealth
diagnose` does.

Exit codes (CONTRACT.md §2), with `--wait`: 0 no finding at or above `--fail-on`; 1 at least
one; 2 bad input or usage (a file, an option, an API key, a model or batch the server
rejected: the message on stderr says which); 3 internal failure (server unreachable or
failing, the job crashed, timed out or was cancelled). Without `--wait`: 0 once queued.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli import app
from service.cli.diagnose import (
    _SEVERITY_RANK,
    EXIT_BAD_INPUT,
    EXIT_FINDINGS,
    EXIT_INTERNAL,
    EXIT_OK,
    print_report,
)

DEFAULT_SERVER = "http://127.0.0.1:8000"
POLL_START_S = 0.1  # first polls are quick: a warm worker answers a tiny model in ~1 s
POLL_MAX_S = 2.0
HTTP_TIMEOUT_S = 60.0
FINISHED = ("succeeded", "failed", "cancelled")
# Job error codes that are not the submitter's doing (exit 3); anything else is bad input (2).
INTERNAL_ERROR_CODES = frozenset(
    {"internal_error", "worker_crashed", "lease_expired", "timeout", "blob_not_found", "cancelled"}
)


class SubmitError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


@app.command("submit")
def submit_command(
    model: Annotated[Path, typer.Argument(help="ONNX, TorchScript or torch.export (.pt2) file")],
    batch: Annotated[Path, typer.Option("--batch", help=".npz, .safetensors or .pt sample batch")],
    server: Annotated[
        str, typer.Option(envvar="GRADHEALTH_SERVER", help="the gradhealth API")
    ] = DEFAULT_SERVER,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="GRADHEALTH_API_KEY", help="API key (gradhealth keys create)"),
    ] = None,
    wait: Annotated[bool, typer.Option(help="wait for the report and print it")] = False,
    name: Annotated[str | None, typer.Option(help="model name (default: the file name)")] = None,
    loss: Annotated[
        str | None,
        typer.Option(help="cross_entropy|nll|mse|l1|bce_with_logits|bce|output_norm|model_output"),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|cuda:N")] = None,
    mode: Annotated[str | None, typer.Option(help="train|eval")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32|bf16|fp16")] = None,
    output_format: Annotated[str, typer.Option("--format", help="table|json")] = "table",
    fail_on: Annotated[str, typer.Option(help="warning|error")] = "error",
    timeout: Annotated[
        float, typer.Option(min=1, help="seconds to wait for the report with --wait")
    ] = 3600.0,
) -> None:
    """Upload a model and a batch to a gradhealth server and (with --wait) print the report."""
    try:
        if output_format not in ("table", "json"):
            raise SubmitError(f"--format must be table or json, not {output_format!r}", 2)
        if fail_on not in ("warning", "error"):
            raise SubmitError(f"--fail-on must be warning or error, not {fail_on!r}", 2)
        if not api_key:
            raise SubmitError(
                "no API key: pass --api-key or set GRADHEALTH_API_KEY "
                "(create one with `gradhealth keys create --tenant NAME`)",
                EXIT_BAD_INPUT,
            )
        for path, what in ((model, "model"), (batch, "batch")):
            if not path.is_file():
                raise SubmitError(f"the {what} file {str(path)!r} does not exist", EXIT_BAD_INPUT)
        fields = {
            "name": name,
            "loss": loss,
            "device": device,
            "mode": mode,
            "precision": precision,
        }
        client = Client(server, api_key)
        try:
            job = client.run(model, batch, {k: v for k, v in fields.items() if v is not None})
            if not wait:
                sys.stdout.write(json.dumps({"id": job["id"], "status": job["status"]}) + "\n")
                raise typer.Exit(EXIT_OK)
            job = wait_for_report(client, job["id"], timeout)
        finally:
            client.close()
    except SubmitError as exc:
        typer.echo(f"gradhealth: {exc.message}", err=True)
        raise typer.Exit(exc.exit_code) from None
    raise typer.Exit(print_result(job, output_format, fail_on))


class Client:
    """The few calls `submit` makes, with errors turned into exit codes."""

    def __init__(self, server: str, api_key: str) -> None:
        import httpx

        self.server = server.rstrip("/")
        self._http = httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=HTTP_TIMEOUT_S,
        )

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise SubmitError(f"cannot reach {self.server}: {exc}", EXIT_INTERNAL) from exc
        if response.status_code >= 400:
            raise SubmitError(_api_error(response), _exit_for_status(response.status_code))
        body: dict[str, Any] = response.json()
        return body

    def run(self, model: Path, batch: Path, fields: dict[str, str]) -> dict[str, Any]:
        with ExitStack() as stack:
            upload = model
            data_files = external_data_files(model)
            if data_files:  # the .onnx and its data files as one zip bundle, as the API takes
                upload = stack.enter_context(bundled(model, data_files))
            # File objects: httpx streams them in chunks instead of reading whole files.
            model_file = stack.enter_context(upload.open("rb"))
            batch_file = stack.enter_context(batch.open("rb"))
            files = {"model": (upload.name, model_file), "batch": (batch.name, batch_file)}
            data = {"name": model.name, **fields}
            return self._call("POST", "/v1/diagnoses:run", files=files, data=data)

    def get(self, diagnosis_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/diagnoses/{diagnosis_id}")


def external_data_files(model: Path) -> list[str]:
    """The files an ONNX model keeps its weights in beside it (`torch.onnx.export` writes
    `model.onnx.data` by default), as the model names them; [] for other formats and for a
    model holding all its weights. A named file that is missing, or outside the model's
    folder, is a SubmitError naming it."""
    if model.suffix.lower() != ".onnx":
        return []
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # not parseable here: the server says what is wrong with it
        return []
    locations = sorted(
        {
            entry.value
            for tensor in _get_all_tensors(proto)
            if uses_external_data(tensor)
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )
    folder = model.resolve().parent
    for location in locations:
        path = (folder / location).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise SubmitError(
                f"the model {model.name!r} keeps weights in {location!r}, which is not a file "
                f"in {str(folder)!r} (external data must sit beside the .onnx file)",
                EXIT_BAD_INPUT,
            )
    return locations


@contextmanager
def bundled(model: Path, data_files: list[str]) -> Iterator[Path]:
    """A temporary zip (stored, not compressed: weights do not compress) holding `model` and
    its external data files under the names the model gives them."""
    with tempfile.TemporaryDirectory(prefix="gradhealth-submit-") as directory:
        bundle = Path(directory) / f"{model.stem}.zip"
        with zipfile.ZipFile(bundle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.write(model, model.name)
            for location in data_files:
                archive.write(model.parent / location, location)
        yield bundle


def _api_error(response: Any) -> str:
    try:
        error = response.json()["error"]
        message = f"{error['message']} ({error['code']}, HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}: {response.text[:200]}"
    if response.status_code == 401:
        message += "; check --api-key / GRADHEALTH_API_KEY"
    return message


def _exit_for_status(status: int) -> int:
    return EXIT_BAD_INPUT if 400 <= status < 500 else EXIT_INTERNAL


def wait_for_report(client: Client, diagnosis_id: str, timeout_s: float) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    deadline = time.monotonic() + timeout_s
    interval = POLL_START_S
    with Progress(
        SpinnerColumn(),
        TextColumn("diagnosis {task.fields[id]}: {task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("queued", id=diagnosis_id)
        while True:
            job = client.get(diagnosis_id)
            status = job["status"]
            attempts = job.get("attempts") or 0
            progress.update(task, description=f"{status} (attempt {attempts})")
            if status in FINISHED:
                return job
            if time.monotonic() > deadline:
                raise SubmitError(
                    f"no report after {timeout_s:g} s (status {status}); raise --timeout or "
                    f"look later: GET {client.server}/v1/diagnoses/{diagnosis_id}",
                    EXIT_INTERNAL,
                )
            time.sleep(interval)
            interval = min(POLL_MAX_S, interval * 1.5)


def print_result(job: dict[str, Any], output_format: str, fail_on: str) -> int:
    """Print a finished job; return the exit code."""
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        code = error.get("code") or job["status"]
        message = error.get("message") or f"the diagnosis ended {job['status']}"
        typer.echo(f"gradhealth: diagnosis {job['id']} {job['status']}: {message}", err=True)
        return EXIT_INTERNAL if code in INTERNAL_ERROR_CODES else EXIT_BAD_INPUT
    report = job.get("report") or {}
    if output_format == "json":
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        _print_table(report)
    threshold = _SEVERITY_RANK[fail_on]
    findings = report.get("findings") or []
    failing = any(_SEVERITY_RANK.get(f.get("severity"), 0) >= threshold for f in findings)
    return EXIT_FINDINGS if failing else EXIT_OK


def _print_table(report: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from service.engine.report import Report

    try:
        parsed = Report.model_validate(report)
    except ValidationError:  # a server newer than this client: show the JSON rather than fail
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    print_report(parsed)
