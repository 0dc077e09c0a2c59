rule schedule:
    """The real sampler's timesteps; every feature job checks its UNet calls against it."""
    output:
        "results/schedule.json",
    params:
        scheduler_config=SCHEDULER_CONFIG,
        strategy=config["sampler_strategy"],
        num_steps=config["num_denoising_steps"],
        model=config["model"],
    log:
        "logs/schedule.log",
    conda:
        "../envs/nullcov.yaml"
    script:
        "../scripts/schedule.py"
