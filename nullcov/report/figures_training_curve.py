"""The model's training curve (rule ``training_curve``): the losses a model folder's
``training.json`` records (:mod:`nullcov.shapes.train`)."""

from __future__ import annotations

from nullcov.report.plotting import pyplot, save

STAGE_TITLES = {"vae": "VAE (reconstruction MSE + KL)", "unet_text": "UNet + text encoder (noise MSE)"}


def training_curve_figure(path, record: dict) -> None:
    """The shipped model's training losses (``training.json`` of :mod:`nullcov.shapes.train`): the
    VAE's reconstruction loss and the UNet's noise-prediction loss, per logged window."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.0))
    for ax, (stage, title) in zip(axes, STAGE_TITLES.items(), strict=True):
        steps, losses = zip(*record["loss"][stage], strict=True)
        ax.plot(steps, losses, color="tab:blue")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("mean loss per logged window")
        ax.set_title(f"{title}, {record['seconds'][stage]:.0f} s")
        ax.grid(alpha=0.3)
    settings = record["settings"]
    fig.suptitle(f"builtin:shapes training: seed {settings['seed']}, batch {settings['batch_size']}, "
                 f"{record['seconds']['total'] / 60:.1f} min on {record['machine']['torch_threads']} CPU threads")
    save(fig, path)
