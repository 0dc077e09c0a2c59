"""Train ``builtin:shapes`` from scratch on the CPU: a tiny SD-1.x-structured model of the shapes world.

The same classes a real SD-1.x checkpoint has, trained the way SD was, only small:

1. the project's CLIP BPE tokenizer, merges learned on the grammar's words (:func:`nullcov.shapes.grammar.vocabulary`);
   when the folder is saved, :data:`nullcov.shapes.rare_tokens.RARE_TOKENS` are added as single tokens no caption holds;
2. an ``AutoencoderKL`` with 3 levels (32 px images -> 4 x 8 x 8 latents), reconstruction + a small KL
   term; its ``scaling_factor`` is set from the latents' standard deviation, as SD's 0.18215 was;
3. a ``CLIPTextModel`` and a ``UNet2DConditionModel`` trained jointly on the frozen VAE's latents:
   DDPM noise with DDPM's linear betas (1000 steps, :data:`SHAPES_SCHEDULER_CONFIG`), epsilon
   prediction, Min-SNR-5 loss weighting, AdamW with warm-up and cosine decay, 10 % of captions
   dropped to ``""`` for classifier-free guidance.

Every source of randomness is seeded (data: :func:`nullcov.shapes.grammar.training_batch` by sample index;
weights, timesteps and noise: ``torch`` generators from :attr:`ShapesTraining.seed`). The result is a
normal diffusers folder (UNet and VAE in float16, the text encoder in float32;
``DiffusionPipeline.from_pretrained(folder)`` loads it, default size 32 px), with ``training.json``
(settings, seeds, loss curve, times, versions) and ``SHA256SUMS``
(checked whenever nullcov loads the folder, see :func:`nullcov.models.model.check_manifest`).

Usage::

    python -m nullcov.shapes.train [--out nullcov/builtin/shapes] [--unet-steps N] [--vae-steps N]
                                   [--text-hidden-size 64]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from nullcov.files import write_text
from nullcov.models.model import BUILTIN_SHAPES_DIR, MANIFEST
from nullcov.models.tiny_model import (
    TINY_SCHEDULER_CONFIG,
    model_index,
    text_encoder_config,
    write_model_json,
    write_tokenizer,
)
from nullcov.shapes import grammar as shapes
from nullcov.shapes.rare_tokens import add_rare_tokens

TRAINING_RECORD = "training.json"
#: SD-1.5's scheduler config with DDPM's linear betas (1e-4 to 0.02). SD's ``scaled_linear`` betas end
#: at alphas_cumprod 0.0047: the last training step still shows 7 % of the image, and a model of 8 x 8
#: latents learns to read the object's place from that residue instead of from the caption, so at
#: sampling time the seed's noise, not "on the left", decides where the shape goes (measured: position
#: read correctly in 25 % of samples, chance, with colour and shape at 100 %). Linear betas end at
#: alphas_cumprod 4e-5 (0.6 % of the image).
SHAPES_SCHEDULER_CONFIG = TINY_SCHEDULER_CONFIG | {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
TEXT_HIDDEN_SIZE = 64


@dataclass(frozen=True)
class ShippedGoals:
    """What a model must meet to be shipped as ``builtin:shapes`` (a wider or retrained one replaces it only
    if it does): its CPU training time, its folder's size, and the accuracy per attribute the evaluator
    reads on the 240 grammar prompts (``tools/bench_shapes.py``)."""

    training_seconds: float = 30 * 60
    folder_bytes: int = 8 * 1024**2
    accuracy: tuple[tuple[str, float], ...] = (("colour", 0.95), ("position", 0.90), ("shape", 0.85))

    def failures(self, training_seconds: float, folder_bytes: int, accuracy: dict[str, float]) -> list[str]:
        """Every goal a model misses, in words (empty: it meets them all)."""
        missed = []
        if training_seconds > self.training_seconds:
            missed.append(f"training took {training_seconds / 60:.1f} min (goal <= {self.training_seconds / 60:.0f})")
        if folder_bytes > self.folder_bytes:
            missed.append(f"folder is {folder_bytes / 1024**2:.1f} MiB (goal <= {self.folder_bytes / 1024**2:.0f})")
        missed += [f"{attribute} accuracy {100 * accuracy[attribute]:.1f} % (goal >= {100 * least:.0f})"
                   for attribute, least in self.accuracy if accuracy[attribute] < least]
        return missed


SHIPPED_GOALS = ShippedGoals()


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under ``folder``."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


@dataclass
class ShapesTraining:
    """Every setting of a training run (recorded in ``training.json``)."""

    seed: int = 0
    batch_size: int = 32
    vae_steps: int = 600
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 5000
    unet_learning_rate: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    #: Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' ``--snr_gamma``): easy low-noise
    #: steps weigh min(SNR, gamma) / SNR, so the high-noise steps that decide the layout count more.
    snr_gamma: float = 5.0
    #: Share of each batch whose timestep is drawn from [high_noise_start, 1000) instead of [0, 1000):
    #: the steps where the sampler decides the layout. With uniform timesteps every position the
    #: model got wrong was a left/right swap; continuing it with half of each batch in [600, 1000)
    #: removed them (docs/shapes-model.md, "Why half of the timesteps are noisy").
    high_noise_fraction: float = 0.5
    high_noise_start: int = 600
    #: Samples the VAE's scaling factor is measured on.
    scaling_samples: int = 512
    log_every: int = 50
    vae_blocks: tuple[int, ...] = (32, 64, 64)
    #: Three levels: 8 x 8 latents -> 4 x 4 -> a 2 x 2 middle block.
    unet_blocks: tuple[int, ...] = (32, 48, 64)
    text_hidden_size: int = TEXT_HIDDEN_SIZE


def vae_config(settings: ShapesTraining) -> dict:
    levels = len(settings.vae_blocks)
    return {
        "sample_size": shapes.RESOLUTION,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": list(settings.vae_blocks),
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 8,
    }


def unet_config(settings: ShapesTraining) -> dict:
    levels = len(settings.unet_blocks)
    return {
        "sample_size": shapes.RESOLUTION // 2 ** (len(settings.vae_blocks) - 1),
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": list(settings.unet_blocks),
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D"] * levels,
        "up_block_types": ["CrossAttnUpBlock2D"] * levels,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": settings.text_hidden_size,
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


class Progress:
    """One log line every ``every`` steps: step, mean loss since the last line, elapsed time and ETA."""

    def __init__(self, stage: str, total: int, every: int, log):
        self.stage, self.total, self.every, self.log = stage, total, every, log
        self.start = time.perf_counter()
        self.end: float | None = None
        self.window: list[float] = []
        self.curve: list[tuple[int, float]] = []

    def step(self, index: int, loss: float) -> None:
        self.window.append(loss)
        done = index + 1
        if done % self.every and done != self.total:
            return
        mean = sum(self.window) / len(self.window)
        self.window = []
        if done == self.total:
            self.end = time.perf_counter()
        self.curve.append((done, mean))
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done)
        self.log(f"{self.stage} step {done}/{self.total}  loss {mean:.5f}  elapsed {elapsed:.0f} s  ETA {eta:.0f} s")

    @property
    def seconds(self) -> float:
        """Wall time of the stage (up to now while it runs)."""
        return (self.end or time.perf_counter()) - self.start


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(settings: ShapesTraining, log):
    """The autoencoder, trained on rendered shapes (all shapes, unseen ones included: it is the
    image codec, not the concept learner); returns (vae, progress)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(settings.seed)
    vae = AutoencoderKL(**vae_config(settings))
    optimiser = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: cosine_schedule(step, settings.vae_steps, settings.warmup_steps))
    generator = torch.Generator().manual_seed(settings.seed)
    progress = Progress("vae", settings.vae_steps, settings.log_every, log)
    for step in range(settings.vae_steps):
        _, pixels = shapes.training_batch(settings.seed + 1, step * settings.batch_size, settings.batch_size,
                                          shapes.ALL_SHAPES)
        pixels = torch.from_numpy(pixels)
        posterior = vae.encode(pixels).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = torch.nn.functional.mse_loss(reconstruction, pixels) + settings.vae_kl_weight * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        progress.step(step, loss.item())
    vae.eval().requires_grad_(False)
    return vae, progress


def encode_images(vae, pixels):
    """Latents the UNet is trained on: the posterior's mean times the VAE's scaling factor."""
    import torch

    with torch.no_grad():
        return vae.encode(torch.from_numpy(pixels)).latent_dist.mean * vae.config.scaling_factor


def set_scaling_factor(vae, settings: ShapesTraining) -> float:
    """``scaling_factor`` = 1 / std of the latents of ``scaling_samples`` fresh renders (SD's 0.18215
    was measured the same way); returns it."""
    import torch

    _, pixels = shapes.training_batch(settings.seed + 2, 0, settings.scaling_samples)
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(pixels)).latent_dist.mean
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


def sample_timesteps(settings: ShapesTraining, num_train_timesteps: int, count: int, generator):
    """Training timesteps of one batch: uniform, except the first ``high_noise_fraction`` of the batch,
    drawn from ``[high_noise_start, num_train_timesteps)``."""
    import torch

    timesteps = torch.randint(0, num_train_timesteps, (count,), generator=generator)
    high = round(settings.high_noise_fraction * count)
    if high:
        timesteps[:high] = torch.randint(settings.high_noise_start, num_train_timesteps, (high,), generator=generator)
    return timesteps


def train_denoiser(settings: ShapesTraining, vae, tokenizer, log):
    """Text encoder and UNet, trained jointly on the frozen VAE's latents; returns (text_encoder, unet, progress)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(settings.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(
        len(tokenizer), settings.text_hidden_size, intermediate_size=2 * settings.text_hidden_size)))
    torch.manual_seed(settings.seed)
    unet = UNet2DConditionModel(**unet_config(settings))
    noise_scheduler = DDPMScheduler.from_config(SHAPES_SCHEDULER_CONFIG)
    snr = noise_scheduler.alphas_cumprod / (1 - noise_scheduler.alphas_cumprod)
    snr_weight = torch.clamp(snr, max=settings.snr_gamma) / snr
    parameters = list(text_encoder.parameters()) + list(unet.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=settings.unet_learning_rate, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: cosine_schedule(step, settings.unet_steps, settings.warmup_steps))
    generator = torch.Generator().manual_seed(settings.seed + 3)
    progress = Progress("unet+text", settings.unet_steps, settings.log_every, log)
    for step in range(settings.unet_steps):
        captions, pixels = shapes.training_batch(settings.seed, step * settings.batch_size, settings.batch_size)
        dropped = torch.rand(len(captions), generator=generator) < settings.caption_dropout
        captions = ["" if drop else text for text, drop in zip(captions, dropped.tolist())]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        latents = encode_images(vae, pixels)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = sample_timesteps(settings, noise_scheduler.config.num_train_timesteps, len(captions), generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        per_sample = (prediction - noise).square().mean(dim=(1, 2, 3))
        loss = (snr_weight[timesteps] * per_sample).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        scheduler.step()
        progress.step(step, loss.item())
    return text_encoder.eval(), unet.eval(), progress


def write_manifest(folder: Path) -> None:
    """``SHA256SUMS`` (``sha256sum -c`` format) over every other file of the folder."""
    lines = [f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(folder).as_posix()}"
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST]
    write_text(folder / MANIFEST, "\n".join(lines) + "\n")


def _versions() -> dict:
    from nullcov.provenance import package_versions

    return package_versions()


def save_model(out_dir: Path, settings: ShapesTraining, vae, text_encoder, unet, record: dict) -> Path:
    """Write the diffusers folder (float16 weights) atomically into ``out_dir``."""
    import torch
    from diffusers import __version__ as diffusers_version

    from nullcov.files import atomic_folder

    out_dir = Path(out_dir).resolve()
    with atomic_folder(out_dir) as tmp:
        write_model_json(tmp / "model_index.json", model_index("sd1", diffusers_version))
        write_model_json(tmp / "scheduler" / "scheduler_config.json", SHAPES_SCHEDULER_CONFIG)
        write_tokenizer(tmp / "tokenizer", shapes.vocabulary(), num_merges=10_000)
        # diffusers loads float16 weights as float32 unless asked otherwise; transformers keeps the stored
        # dtype, so the (small) text encoder is stored in float32 for a plain from_pretrained to work.
        for name, module, dtype in (("vae", vae, torch.float16), ("unet", unet, torch.float16),
                                    ("text_encoder", text_encoder, torch.float32)):
            module.to(dtype).save_pretrained(tmp / name, safe_serialization=True)
            module.to(torch.float32)
        record = record | {"rare_tokens": add_rare_tokens(tmp)}
        write_model_json(tmp / TRAINING_RECORD, record)
        write_manifest(tmp)
    return out_dir


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


def train(out_dir: Path, settings: ShapesTraining, log=print) -> Path:
    """The whole run: tokenizer, VAE, text encoder + UNet, then the folder; returns its path."""
    import torch

    torch.manual_seed(settings.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        write_tokenizer(Path(scratch), shapes.vocabulary(), num_merges=10_000)
        tokenizer = load_tokenizer(Path(scratch))
    log(f"tokenizer: {len(tokenizer)} tokens for {len(shapes.vocabulary())} words; "
        f"torch threads {torch.get_num_threads()}")
    vae, vae_progress = train_vae(settings, log)
    factor = set_scaling_factor(vae, settings)
    log(f"vae scaling_factor {factor:.5f}")
    text_encoder, unet, unet_progress = train_denoiser(settings, vae, tokenizer, log)
    record = {
        "command": " ".join(["python -m nullcov.shapes.train", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "torch_threads": torch.get_num_threads()},
        "versions": _versions(),
        "settings": asdict(settings),
        "vae_scaling_factor": factor,
        "seconds": {"vae": round(vae_progress.seconds, 1), "unet_text": round(unet_progress.seconds, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "loss": {"vae": vae_progress.curve, "unet_text": unet_progress.curve},
    }
    return save_model(out_dir, settings, vae, text_encoder, unet, record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=BUILTIN_SHAPES_DIR,
                        help="model folder to write (replaced atomically)")
    defaults = ShapesTraining()
    parser.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--text-hidden-size", type=int, default=defaults.text_hidden_size,
                        help="width of the text encoder (and of every attn2 to_k/to_v input)")
    args = parser.parse_args(argv)
    settings = ShapesTraining(seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                              text_hidden_size=args.text_hidden_size)
    print(train(args.out, settings, log=lambda line: print(line, flush=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
