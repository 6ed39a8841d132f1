"""CLI: `checkpoint` (a TensorRT-LLM checkpoint for trtllm-build, written and verified on any machine with torch)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vlmforge.cli.app import app, console, print_json
from vlmforge.cli.specs import DtypeOpt, JsonOpt, PpOpt, QuantOpt, TpOpt
from vlmforge.errors import SpecError
from vlmforge.specs.schema import BuildSpec, KvCacheDtype
from vlmforge.toolchains.quantize.checkpoint import CheckpointKind


def checkpoint_overrides(*, quant: Any = None, kv_cache_dtype: KvCacheDtype | None = None, group_size: int | None = None,
                         calib_source: str | None = None, calib_size: int | None = None,
                         calib_batch_size: int | None = None, calib_seed: int | None = None, tp: int | None = None,
                         pp: int | None = None, dtype: Any = None, max_logit_error: float | None = None) -> dict[str, Any]:
    values = {
        "quantization.method": quant.value if quant else None,
        "quantization.kv_cache_dtype": kv_cache_dtype.value if kv_cache_dtype else None,
        "quantization.group_size": group_size,
        "quantization.calibration.source": calib_source,
        "quantization.calibration.size": calib_size,
        "quantization.calibration.batch_size": calib_batch_size,
        "quantization.calibration.seed": calib_seed,
        "parallel.tp": tp,
        "parallel.pp": pp,
        "dtype": dtype.value if dtype else None,
        "validation.max_logit_error": max_logit_error,
    }
    return {key: value for key, value in values.items() if value is not None}


def checkpoint_spec(model_or_spec: str, family: str | None, overrides: dict[str, Any]) -> tuple[BuildSpec, Path | None]:
    """The spec to write, and the local checkpoint directory when MODEL_OR_SPEC is one (else the spec's source is
    fetched). A directory needs --family; a catalog name or spec file must not contradict it."""
    from vlmforge.specs.catalog import load_model_or_spec
    from vlmforge.specs.schema import merge_overrides, spec_from_dict

    path = Path(model_or_spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(f"{path} is a directory without config.json: give a checkpoint directory, a catalog name or "
                            "a spec file")
        if not family:
            raise SpecError(f"{path} is a checkpoint directory: say its family with --family (vlmforge families)")
        name = re.sub(r"[^A-Za-z0-9._-]", "-", path.resolve().name).lstrip("._-") or "checkpoint"
        base = {"name": name[:100], "family": family, "source": f"file://{path.resolve()}"}
        return spec_from_dict(merge_overrides(base, overrides), origin=str(path)), path
    spec = load_model_or_spec(model_or_spec, overrides)
    if family and family != spec.family:
        raise SpecError(f"--family {family} but {model_or_spec} is a {spec.family} model", path="family")
    return spec, None


@app.command("checkpoint")
def checkpoint_cmd(
    model_or_spec: Annotated[str, typer.Argument(help="Catalog model name, spec YAML path, or a local checkpoint "
                                                      "directory (with --family).")],
    out: Annotated[Path, typer.Option("--out", help="New or empty directory: config.json + rank{N}.safetensors.")],
    family: Annotated[Optional[str], typer.Option("--family", help="The family of a checkpoint directory.")] = None,
    quant: QuantOpt = None,
    kv_cache_dtype: Annotated[Optional[KvCacheDtype], typer.Option("--kv-cache-dtype", help="quantization.kv_cache_dtype")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="quantization.group_size (int4 groups)")] = None,
    calib_source: Annotated[Optional[str], typer.Option("--calib-source", help="quantization.calibration.source")] = None,
    calib_size: Annotated[Optional[int], typer.Option("--calib-size", min=1, help="quantization.calibration.size")] = None,
    calib_batch_size: Annotated[Optional[int], typer.Option("--calib-batch-size", min=1,
                                                            help="quantization.calibration.batch_size")] = None,
    calib_seed: Annotated[Optional[int], typer.Option("--calib-seed", min=0, help="quantization.calibration.seed")] = None,
    tp: TpOpt = None, pp: PpOpt = None, dtype: DtypeOpt = None,
    max_logit_error: Annotated[Optional[float], typer.Option(
        "--max-logit-error", min=0.0, help="validation.max_logit_error: the accuracy gate on next-token logits.")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda when there is one).")] = None,
    kind: Annotated[CheckpointKind, typer.Option("--kind", help="trtllm (for trtllm-build) or unified (ModelOpt's "
                                                                "Hugging Face checkpoint: TensorRT-LLM's PyTorch backend, vLLM, SGLang).")] = CheckpointKind.TRTLLM,
    report: Annotated[Optional[Path], typer.Option("--report", help="Also write the result (JSON) to this file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the TensorRT-LLM checkpoint that `trtllm-build --checkpoint_dir` takes (LLaMA-type LLMs through NVIDIA
    ModelOpt, OPT through vlmforge's converter), or with --kind unified ModelOpt's Hugging Face checkpoint,
    calibrated on the family's real prefixes; then read it back and compare its logits with the quantized torch
    model and the float32 reference."""
    from vlmforge.families import resolve
    from vlmforge.toolchains.quantize.checkpoint import write_checkpoint

    overrides = checkpoint_overrides(quant=quant, kv_cache_dtype=kv_cache_dtype, group_size=group_size,
                                     calib_source=calib_source, calib_size=calib_size, calib_batch_size=calib_batch_size,
                                     calib_seed=calib_seed, tp=tp, pp=pp, dtype=dtype, max_logit_error=max_logit_error)
    spec, local = checkpoint_spec(model_or_spec, family, overrides)
    resolved = resolve(spec)
    if out.exists() and any(out.iterdir()):
        raise SpecError(f"{out} is not empty: vlmforge checkpoint writes into a new or empty directory")
    if local is not None:
        result = write_checkpoint(resolved, local, out, device=device, kind=kind)
    else:
        from vlmforge.sources import open_source

        with tempfile.TemporaryDirectory(prefix="vlmforge-checkpoint-") as tmp:
            open_source(spec.source).fetch(Path(tmp) / "model")
            result = write_checkpoint(resolved, Path(tmp) / "model", out, device=device, kind=kind)
    data = result.model_dump(mode="json")
    if report is not None:
        import json

        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(data, indent=2))
    if as_json:
        print_json(data)
        return
    check = result.verification
    console.print(f"[bold green]{result.kind.value} checkpoint[/] {out}: {result.writer}, {result.method} ({result.quant_algo or 'float'}"
                  f"{', KV ' + result.kv_cache_quant_algo if result.kv_cache_quant_algo else ''}), tp {result.tp} pp "
                  f"{result.pp}, {len(result.files)} files, {result.bytes / 2**20:.1f} MiB", highlight=False)
    console.print(f"read back: vs the quantized model {check.readback_vs_quantized.max_error:.2e} (allowed "
                  f"{check.tolerance:.2e}); vs the float32 reference: next-token {check.readback_vs_reference.next_token_error:.4f} "
                  f"(allowed {check.max_logit_error_allowed}), all positions {check.readback_vs_reference.max_error:.4f}",
                  highlight=False)
