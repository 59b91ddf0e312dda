__version__ = "0.1.0"


def __getattr__(name):
    "`prompt_tuning_nb.load_model`, imported on first use so that `import prompt_tuning_nb` stays light."
    if name == "load_model":
        from prompt_tuning_nb.models import load_model
        return load_model
    raise AttributeError(f"module 'prompt_tuning_nb' has no attribute {name!r}")
