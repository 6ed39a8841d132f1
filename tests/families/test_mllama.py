"""mllama's cross-attention budget against transformers: the states per image that vlmforge counts for the 1.2
--max_encoder_input_len are the rows transformers' vision model gives (the encoder's padding to a multiple of 8
removed), for Llama-3.2-11B-Vision's 448-pixel tiles and the others' 560, on the 1.2 builder's 2048x2688 dummy image
and on a small one (always padded to 4 tiles)."""

from __future__ import annotations

import pytest

from vlmforge.families.mllama import LLAMA_32, LLAMA_32_BASE_11B, TileGeometry, config_geometry


@pytest.mark.parametrize(("geometry", "size"), [(LLAMA_32_BASE_11B, (100, 30)), (LLAMA_32, (2048, 2688))],
                         ids=["448-small-image", "560-builder-dummy"])
def test_states_per_image_are_transformers_rows(geometry: TileGeometry, size: tuple[int, int]) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from transformers.models.mllama.configuration_mllama import MllamaVisionConfig
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    vision = MllamaVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_global_layers=1, attention_heads=1,
        image_size=geometry.tile, patch_size=geometry.patch, max_num_tiles=geometry.max_tiles,
        vision_output_dim=16, intermediate_layers_indices=[0])
    model = MllamaVisionModel(vision).eval()
    processor_class = getattr(transformers, "MllamaImageProcessorPil", None) or transformers.MllamaImageProcessor
    processor = processor_class(size={"height": geometry.tile, "width": geometry.tile},
                                max_image_tiles=geometry.max_tiles)
    inputs = processor(images=[[Image.new("RGB", size)]], return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[2:4]) == (geometry.max_tiles, 3)  # padded to max_num_tiles
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                    aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
    tiles, rows = out.shape[-3], out.shape[-2]
    assert rows == geometry.states_per_tile and rows % 8 != 0  # the padding to 1608 / 1032 is gone
    assert tiles * rows == geometry.states_per_image == {448: 4100, 560: 6404}[geometry.tile]
    assert config_geometry({"vision_config": vision.to_dict()}) == geometry
