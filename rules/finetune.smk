# The fine-tune proof (config key `finetune_proof`): nullcov/finetune.py.
