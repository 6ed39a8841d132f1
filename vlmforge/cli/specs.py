"""CLI: the catalog (`models`, `families`), specs (`spec schema|show|validate`) and plans (`plan`)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from rich.table import Table

from vlmforge.cli.tables import Col, fit_table

from vlmforge.cli.app import app, console, print_json
from vlmforge.families import ModelFamily, family_names, get_family, resolve
from vlmforge.specs.catalog import catalog_specs, load_model_or_spec
from vlmforge.specs.schema import Dialect, Dtype, QuantMethod, spec_json_schema
from vlmforge.specs.visual import VisualPlacement
from vlmforge.toolchains.trtllm.plan import build_plan

spec_app = typer.Typer(help="Build specs: JSON Schema, show a catalog entry, validate a file.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

# Shared spec overrides (plan, build): each maps to a dotted spec path.
TpOpt = Annotated[Optional[int], typer.Option("--tp", min=1, help="Tensor parallelism (parallel.tp).")]
PpOpt = Annotated[Optional[int], typer.Option("--pp", min=1, help="Pipeline parallelism (parallel.pp).")]
DtypeOpt = Annotated[Optional[Dtype], typer.Option("--dtype", help="LLM precision (dtype).")]
QuantOpt = Annotated[Optional[QuantMethod], typer.Option("--quant", help="Weight quantization (quantization.method).")]
BatchOpt = Annotated[Optional[int], typer.Option("--max-batch-size", min=1, help="limits.max_batch_size")]
InputOpt = Annotated[Optional[int], typer.Option("--max-input-len", min=1, help="limits.max_input_len")]
OutputOpt = Annotated[Optional[int], typer.Option("--max-output-len", min=1, help="limits.max_output_len")]
VisualBatchOpt = Annotated[Optional[int], typer.Option("--visual-batch-size", min=1, help="visual.max_batch_size")]
ImagesOpt = Annotated[Optional[int], typer.Option("--max-images-per-prompt", min=1, help="limits.max_images_per_prompt")]
DialectOpt = Annotated[Optional[Dialect], typer.Option("--dialect", help="TensorRT-LLM dialect (default: the spec's, 1.2).")]


def spec_overrides(
    *, tp: int | None = None, pp: int | None = None, dtype: Dtype | None = None, quant: QuantMethod | None = None,
    max_batch_size: int | None = None, max_input_len: int | None = None, max_output_len: int | None = None,
    visual_batch_size: int | None = None, dialect: Dialect | None = None, max_images_per_prompt: int | None = None,
) -> dict[str, Any]:
    """CLI options as dotted spec overrides (unset options are left out)."""
    values = {
        "parallel.tp": tp,
        "parallel.pp": pp,
        "dtype": dtype.value if dtype else None,
        "quantization.method": quant.value if quant else None,
        "limits.max_batch_size": max_batch_size,
        "limits.max_input_len": max_input_len,
        "limits.max_output_len": max_output_len,
        "visual.max_batch_size": visual_batch_size,
        "limits.max_images_per_prompt": max_images_per_prompt,
        "dialect": dialect.value if dialect else None,
    }
    overrides = {key: value for key, value in values.items() if value is not None}
    if max_output_len is not None:
        overrides["limits.max_seq_len"] = None  # an explicit output length replaces a catalog max_seq_len
    return overrides


@app.command("models")
def models_cmd(as_json: JsonOpt = False) -> None:
    """List the catalog's models (seed models and tiny test models)."""
    rows = []
    for spec in catalog_specs():
        derived = resolve(spec).derived
        rows.append({
            "name": spec.name, "family": spec.family, "source": spec.source, "dtype": spec.dtype.value,
            "max_batch_size": spec.limits.max_batch_size, "num_visual_features": derived.num_visual_features,
            "max_multimodal_len": derived.max_multimodal_len, "tiny": spec.is_tiny,
        })
    if as_json:
        print_json(rows)
        return
    columns = (Col("name", keep=True), Col("family", drop=4), Col("source", keep=True), Col("dtype", drop=3),
               Col("batch", drop=1, justify="right"), Col("visual feats", drop=2, justify="right"),
               Col("mm len", drop=0, justify="right"))
    cells = [(row["name"], row["family"], row["source"], row["dtype"], str(row["max_batch_size"]),
              str(row["num_visual_features"]), str(row["max_multimodal_len"])) for row in rows]
    console.print(fit_table(console, columns, cells, title="vlmforge catalog"))


@app.command("families")
def families_cmd(as_json: JsonOpt = False) -> None:
    """List the supported model families."""
    rows = []
    for name in family_names():
        family = get_family(name)
        rows.append({"name": name, "description": family.description, "encoder_decoder": family.encoder_decoder,
                     "num_visual_features": family.default_num_visual_features, "tiny_source": family.tiny_source,
                     "visual_placement": family.visual_placement.value,
                     "max_images_per_prompt": family.images_per_prompt_limit,
                     "size_dependent_tokens": family.size_dependent_tokens,
                     "default_max_image_size": str(family.default_max_image_size or "") or None,
                     "toolchains": family_toolchains(family)})
    if as_json:
        print_json(rows)
        return
    columns = (Col("family", keep=True), Col("description", drop=4), Col("enc-dec", drop=0),
               Col("visual feats", drop=3), Col("visual rows go to", drop=1), Col("images", drop=2),
               Col("tiny model", keep=True), Col("hf toolchain"), Col("trtllm toolchain"))
    cells = [(row["name"], row["description"], "yes" if row["encoder_decoder"] else "no",
              str(row["num_visual_features"]) + (f" at {row['default_max_image_size']}"
                                                if row["size_dependent_tokens"] else ""),
              row["visual_placement"], str(row["max_images_per_prompt"] or "any"), row["tiny_source"] or "-",
              row["toolchains"]["hf"], row["toolchains"]["trtllm"]) for row in rows]
    console.print(fit_table(console, columns, cells, title="vlmforge families"))


def family_toolchains(family: ModelFamily) -> dict[str, str]:
    """What works for a family on each toolchain, in words (``vlmforge families``)."""
    dialects = ", ".join(dialect.value for dialect in family.plan_dialects)
    serve = "serve" if family.position_id_dims == 1 else "serve (M-RoPE: eager decode, no static GPU path)"
    if family.hf_supported and not dialects:
        return {"hf": f"build, validate, {serve}",
                "trtllm": "no engine (plans refused); deploy --backend trtllm-serve serves its checkpoint"}
    if family.hf_supported:
        if family.visual_placement is VisualPlacement.CROSS_ATTENTION and not family.encoder_decoder:
            serve = "serve (cross-attention states: eager decode, joins at batch boundaries, no static GPU path)"
        return {"hf": f"build, validate, {serve}", "trtllm": f"plan ({dialects}), build (validated against hf)"}
    hf = getattr(family, "hf_status", None) or f"not yet (plan-only; {getattr(family, 'hf_class', 'no transformers class')})"
    return {"hf": hf,
            "trtllm": f"plan ({dialects}) only; run it in NVIDIA's container"}


@app.command("plan")
def plan_cmd(
    model: Annotated[str, typer.Argument(help="Catalog model name or spec YAML path.")],
    dialect: DialectOpt = None, tp: TpOpt = None, pp: PpOpt = None, dtype: DtypeOpt = None, quant: QuantOpt = None,
    max_batch_size: BatchOpt = None, max_input_len: InputOpt = None, max_output_len: OutputOpt = None,
    visual_batch_size: VisualBatchOpt = None, max_images_per_prompt: ImagesOpt = None,
    workspace: Annotated[str, typer.Option(help="Workspace directory inside the container.")] = "/workspace",
    image: Annotated[Optional[str], typer.Option(help="Container image (default: the dialect's release image).")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Say how each derived number was reached (with --json: "
                                                            "an 'explain' list).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Render the exact trtllm build plan: every step's argv, container, GPUs, inputs and outputs."""
    overrides = spec_overrides(tp=tp, pp=pp, dtype=dtype, quant=quant, max_batch_size=max_batch_size,
                               max_input_len=max_input_len, max_output_len=max_output_len,
                               visual_batch_size=visual_batch_size, dialect=dialect,
                               max_images_per_prompt=max_images_per_prompt)
    spec = load_model_or_spec(model, overrides)
    plan = build_plan(spec, workspace=workspace, image=image)
    if as_json:
        data = plan.to_json_dict()
        if explain:
            data["explain"] = [line.model_dump(mode="json") for line in plan.derived.explanation]
        print_json(data)
        return
    derived = plan.derived
    console.print(f"[bold]{spec.name}[/] ({spec.family}) dialect {plan.dialect.value}, image {plan.steps[0].image}")
    console.print(
        f"num_visual_features={derived.num_visual_features}  max_multimodal_len={derived.max_multimodal_len}  "
        f"max_seq_len={derived.max_seq_len}  world_size={derived.world_size}"
        + (f"  min compute capability {derived.min_compute_capability}" if derived.min_compute_capability else ""),
        highlight=False,
    )
    if explain:
        table = Table("number", "value", "how", "what for", title="derived values")
        for line in plan.derived.explanation:
            table.add_row(line.name, str(line.value), line.formula, line.note)
        console.print(table)
    for index, step in enumerate(plan.steps, 1):
        console.print(f"\n[bold]# {index}. {step.name}[/]  (gpus: {step.gpus})", highlight=False)
        console.print(f"cd {shlex.quote(step.cwd)} && {shlex.join(step.argv)}", highlight=False, markup=False, soft_wrap=True)


@spec_app.command("schema")
def spec_schema_cmd() -> None:
    """Print the JSON Schema of spec files (for editors and CI validation)."""
    print_json(spec_json_schema())


@spec_app.command("show")
def spec_show_cmd(
    model: Annotated[str, typer.Argument(help="Catalog model name or spec YAML path.")],
    as_json: JsonOpt = False,
) -> None:
    """Print a full spec (every default filled in) and its derived values."""
    spec = load_model_or_spec(model)
    derived = resolve(spec).derived
    data = {"spec": spec.model_dump(mode="json"), "derived": derived.model_dump(mode="json")}
    if as_json:
        print_json(data)
    else:
        console.print(yaml.safe_dump(data["spec"], sort_keys=False), markup=False, highlight=False)


@spec_app.command("validate")
def spec_validate_cmd(path: Annotated[Path, typer.Argument(help="Spec YAML file.")]) -> None:
    """Validate a spec file and its derived values; exit 2 with the YAML path and fix on error."""
    spec = load_model_or_spec(str(path))
    derived = resolve(spec).derived
    console.print(f"ok: {spec.name} ({spec.family}), max_multimodal_len={derived.max_multimodal_len}, "
                  f"max_seq_len={derived.max_seq_len}", highlight=False)
