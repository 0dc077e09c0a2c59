"""The one image sampler (:func:`nullcov.models.sampling.sample_images`) is the pipeline call, nothing more."""

import copy

import numpy as np
import pytest
import torch

from nullcov.models.sampling import configure_scheduler, prompt_generators, sample_images
from nullcov.models.schedule import build_schedule


def _schedule(pipe, strategy: str, steps: int) -> dict:
    schedule = build_schedule(dict(pipe.scheduler.config), strategy, steps)
    configure_scheduler(pipe, schedule)
    return schedule


def _direct(pipe, prompts, seeds, schedule) -> np.ndarray:
    """The pipeline called directly, one CPU generator per prompt seeded ``seeds[j]``."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return pipe(prompt=prompts, guidance_scale=7.5, generator=generators, output_type="np",
                **schedule["set_timesteps"]).images


@pytest.mark.parametrize("strategy", ["DPM++ 2M Karras", "Euler a"])  # deterministic; noise drawn every step
def test_sample_images_equals_the_pipeline_with_the_same_generators(tiny_pipe, demo_prompts, strategy):
    schedule = _schedule(tiny_pipe, strategy, 3)
    prompts = demo_prompts[:3]
    images = sample_images(tiny_pipe, prompts, prompt_generators(5, 2, 3), schedule, 7.5)
    assert images.dtype == np.float32 and images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(images, _direct(tiny_pipe, prompts, [7, 8, 9], schedule))
    # each prompt's image depends on its own generator only, not on the batch it is drawn in (up to the
    # float32 rounding of a batch of another size)
    np.testing.assert_allclose(sample_images(tiny_pipe, prompts[1:], prompt_generators(5, 3, 2), schedule, 7.5),
                               images[1:], atol=1e-5)


def test_sample_images_uses_another_unet_for_the_call_only(tiny_pipe, demo_prompts):
    schedule = _schedule(tiny_pipe, "DPM++ 2M Karras", 3)
    own = tiny_pipe.unet
    other = copy.deepcopy(own)
    with torch.no_grad():
        for name, parameter in other.named_parameters():
            if ".attn2.to_v." in name:
                parameter.mul_(1.5)
    prompts = demo_prompts[:2]
    images = sample_images(tiny_pipe, prompts, prompt_generators(0, 0, 2), schedule, 7.5, unet=other)
    assert tiny_pipe.unet is own
    tiny_pipe.unet = other
    try:
        expected = _direct(tiny_pipe, prompts, [0, 1], schedule)
    finally:
        tiny_pipe.unet = own
    np.testing.assert_array_equal(images, expected)
    assert not np.array_equal(images, sample_images(tiny_pipe, prompts, prompt_generators(0, 0, 2), schedule, 7.5))
    with pytest.raises(ValueError, match="generators"):  # one generator for two prompts: the pipeline refuses
        sample_images(tiny_pipe, prompts, prompt_generators(0, 0, 1), schedule, 7.5, unet=other)
    assert tiny_pipe.unet is own
