"""A results folder made in process by nullcov's own job functions (schedule, one feature shard, merge,
projection), for the tests of what reads one: the training stage's (UNet and SD3/FLUX transformer)."""

from nullcov.layout import TEXT_NAME, Results, shard_folder

from conftest import base_config

#: The absolute null-space threshold of :func:`build_results` (when no ``threshold_percent`` is given).
THRESHOLD = 0.02
#: :func:`build_mmdit_results`: each statistic's null space is its lowest 30 % of eigenvalues (never
#: empty, never everything).
PERCENT = 30
MMDIT_PROMPTS = ["a red cat", "a blue dog on the grass", "green"]


def build_results(root, model_dir, prompts, num_steps=3, statistic="second_moment", unconditional_branch=False,
                  threshold_percent=None, **overrides):
    """``root/results`` (schedule.json, covariance/, projections/) of ``prompts`` on the model at ``model_dir``.

    A UNet: DPM++ 2M Karras, every cross-attention layer, q/k/v/out. An SD3/FLUX transformer: its
    flow-matching Euler at the config's ``resolution`` (``overrides``: ``streams``, ``resolution``,
    ``guidance_scale``, ...), every block; a text file when the streams name the text path."""
    from nullcov.collection.features import run_feature_job
    from nullcov.models.family import model_family, text_path_keys
    from nullcov.models.model import (
        cross_attention_layer_names,
        load_pipeline,
        scheduler_config,
        transformer_layer_names,
    )
    from nullcov.models.sampling import flow_of
    from nullcov.models.schedule import build_schedule, write_schedule
    from nullcov.prompts import prompt_set_sha256
    from nullcov.statistics.jobs import merge_job, projection_job

    config = base_config(num_denoising_steps=num_steps, batch_size=len(prompts),
                         unconditional_branch=unconditional_branch, **overrides)
    results = root / "results"
    if model_family(model_dir).denoiser == "transformer":
        pipe = load_pipeline(model_dir, "float32", "cpu")
        scheduled = build_schedule(dict(pipe.scheduler.config), "Euler", num_steps, flow_of(pipe, config["resolution"]))
        layers, text = transformer_layer_names(model_dir), bool(text_path_keys(config["streams"]))
        config["sampler_strategy"] = "Euler"
    else:
        scheduled = build_schedule(scheduler_config(str(model_dir)), "DPM++ 2M Karras", num_steps)
        layers, text = cross_attention_layer_names(model_dir), True
    schedule = write_schedule(Results(results).schedule, scheduled, layers, str(model_dir))
    names = [step["name"] for step in schedule["steps"]] + ([TEXT_NAME] if text else [])
    shard = results / shard_folder("0000")
    run_feature_job(model_spec=str(model_dir), model_dir=str(model_dir), prompts=prompts, first_index=0,
                    shard="0000", schedule=schedule, config=config,
                    step_paths={step["name"]: str(shard / f"{step['name']}.h5") for step in schedule["steps"]},
                    text_path=str(shard / "text.h5") if text else None)
    for name in names:
        merge_job([shard / f"{name}.h5"], Results(results).covariance(name), prompt_set_sha256(prompts))
        projection_job(Results(results).covariance(name), Results(results).projection(name), statistic,
                       THRESHOLD, threshold_percent)
    return results


def build_mmdit_results(root, family: str):
    """``(model folder, results folder)`` of a tiny SD3 or FLUX (guidance embedding) built under ``root``:
    every default stream, FLUX's proj_out (``single_out``) and the text path, 3 Euler steps at 32 px,
    :data:`PERCENT` % null spaces."""
    from nullcov.models.family import DEFAULT_STREAMS
    from nullcov.models.tiny_model import build_tiny_model

    model_dir = build_tiny_model(root / "model", family)
    streams = [*DEFAULT_STREAMS, "context", "pooled"] + (["single_out"] if family == "flux" else [])
    return model_dir, build_results(root, model_dir, MMDIT_PROMPTS, num_steps=3, threshold_percent=PERCENT,
                                    streams=streams, resolution=32, guidance_scale=3.0, true_cfg_scale=1.0)
