"""``vlmforge selftest --backend trtllm-serve``: prove a site's TensorRT-LLM container in minutes. A tiny random
LLaVA-NeXT (an architecture of the release's multimodal support matrix, built here from a config: no download) is
deployed through the trtllm-serve backend, asked about an image with the official ``openai`` client, and its answer
compared with the same model's greedy output in transformers (float32, on the CPU).

It refuses before any work where it cannot run (no NVIDIA GPU, no Docker daemon with the NVIDIA runtime, no
release image), saying what is missing. The parts that need none of that (the model folder, the request, the
reference and the comparison) are plain functions, tested everywhere.
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vlmforge.errors import DeployError

log = logging.getLogger(__name__)

MODEL_NAME = "tiny-llava-next"
ARCHITECTURE = "LlavaNextForConditionalGeneration"
IMAGE_SIZE, PATCH_SIZE = 28, 14
PROMPT = "What is shown in this image?"
MAX_TOKENS = 16
MIN_AGREEMENT = 0.8
"""Share of the reference's tokens the served answer must reproduce (a float16 engine against a float32 reference on
a random model: near-ties may flip late tokens, not the first ones)."""
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %} {% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}"
    "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
"""LLaVA's conversation format; content as a string (placeholders inserted by the server) or as parts."""


def make_tiny_llava_next(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random LLaVA-NeXT as a Hugging Face model folder trtllm-serve loads: weights in float16, the tokenizer,
    the image processor and a chat template. Head dimension 64 in both towers (what attention kernels support)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from vlmforge.families.tinykit import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, make_fast_tokenizer
    from vlmforge.modeling.devices import seed_all

    seed_all(seed)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=128)
    text = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=BOS_ID,
                       eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=0.05)
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                             image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
                             vision_feature_layer=-1)
    model = LlavaNextForConditionalGeneration(config).eval()
    tokenizer = make_fast_tokenizer(template="bos", vocab_size=320)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                              crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    out_dir = Path(out_dir)
    model.to(torch.float16).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def golden_image() -> Any:
    from vlmforge.modeling.images import synthetic_images

    return synthetic_images(2 * IMAGE_SIZE)[2]


def data_url(image: Any) -> str:
    """``image`` as a ``data:image/png;base64,...`` URL (what an OpenAI client sends for a local image)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_request(model: str, image: Any, text: str = PROMPT, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """The arguments of ``client.chat.completions.create``: one user message, an ``image_url`` part and a ``text``
    part, greedy."""
    return {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "messages": [{
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                    {"type": "text", "text": text}]}]}


def reference_tokens(model_dir: Path, image: Any, text: str = PROMPT, max_tokens: int = MAX_TOKENS) -> list[int]:
    """The model's own greedy answer in transformers (float32, CPU): the new token ids, end token excluded."""
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaNextForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    return new[:new.index(eos)] if eos in new else new


class Comparison(BaseModel):
    """The served answer against the reference's tokens."""

    agreement: float
    """Share of the reference's tokens whose text the served answer reproduces, from the start."""
    matched_tokens: int
    reference_text: str
    served_text: str

    @property
    def passed(self) -> bool:
        return self.agreement >= MIN_AGREEMENT


def compare(reference: list[int], served_text: str, tokenizer: Any) -> Comparison:
    """How many of the reference's tokens, decoded, begin the served text (compared as text: the server returns
    text, and re-tokenizing it need not give the ids it generated)."""
    matched = 0
    for count in range(1, len(reference) + 1):
        if served_text.startswith(tokenizer.decode(reference[:count], skip_special_tokens=True)):
            matched = count
        else:
            break
    reference_text = tokenizer.decode(reference, skip_special_tokens=True)
    agreement = matched / len(reference) if reference else float(served_text == "")
    return Comparison(agreement=round(agreement, 4), matched_tokens=matched, reference_text=reference_text,
                      served_text=served_text)


class SelftestResult(BaseModel):
    image: str
    deployment: str
    endpoint: str
    comparison: Comparison


def run_selftest(work: Path, *, image: str | None = None, tp: int = 1, port: int | None = None,
                 wait_s: float = 1800.0) -> SelftestResult:
    """Deploy the tiny model with trtllm-serve, ask it about the golden image with the openai client, compare with
    the reference; the deployment is stopped whatever happens. DeployError where it cannot run or does not agree."""
    from vlmforge.deploy.launchers.base import free_port
    from vlmforge.deploy.launchers.trtllm import preflight
    from vlmforge.deploy.service import stop_deployment
    from vlmforge.deploy.trtllm_deploy import LocalCheckpointSource, deploy_trtllm_serve, plan_trtllm_serve
    from vlmforge.deploy.trtllm_serve import default_image

    image = image or default_image()
    preflight(image, tp)  # no GPU, daemon, NVIDIA runtime or image: refused before any work
    try:
        import openai
    except ImportError:
        raise DeployError("the selftest asks with the official openai client: pip install 'vlmforge[trtllm-serve]'") from None
    folder = make_tiny_llava_next(work / MODEL_NAME)
    picture = golden_image()
    reference = reference_tokens(folder, picture)
    state = work / "state"
    plan = plan_trtllm_serve(MODEL_NAME, LocalCheckpointSource(folder, MODEL_NAME), tp=tp, port=port or free_port(),
                             state_dir=state, image=image, max_batch_size=2, max_seq_len=512)
    deployment = deploy_trtllm_serve(plan, LocalCheckpointSource(folder, MODEL_NAME), state_dir=state, wait_s=wait_s)
    try:
        client = openai.OpenAI(base_url=f"{deployment.endpoint}/v1", api_key="unused", timeout=300)
        answer = client.chat.completions.create(**chat_request(MODEL_NAME, picture))
        served = answer.choices[0].message.content or ""
    finally:
        log.info("stopping %s: %s", deployment.name, stop_deployment(deployment, state_dir=state, timeout=60))
    from transformers import AutoTokenizer

    comparison = compare(reference, served, AutoTokenizer.from_pretrained(folder))
    result = SelftestResult(image=image, deployment=deployment.name, endpoint=deployment.endpoint,
                            comparison=comparison)
    if not comparison.passed:
        raise DeployError(f"trtllm-serve answered {served!r}; the reference says {comparison.reference_text!r}: "
                          f"{comparison.matched_tokens} of {len(reference)} tokens agree (need {MIN_AGREEMENT:.0%})")
    return result
