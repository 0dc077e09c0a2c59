rule schedule:
    """The real sampler's timesteps and the layers to collect, checked against the model (CPU).

    Every feature job checks its UNet calls against it.
    """
    input:
        model=model_input,
    output:
        "results/schedule.json",
    log:
        "logs/schedule.log",
    localrule: True
    conda:
        "../envs/nullcov.yaml"
    params:
        scheduler_config=SCHEDULER_CONFIG,
        strategy=config["sampler_strategy"],
        num_steps=config["num_denoising_steps"],
        model=config["model"],
        model_dir=str(MODEL_DIR),
        layers=config["cross_attention_layers"],
    script:
        "../scripts/schedule.py"
