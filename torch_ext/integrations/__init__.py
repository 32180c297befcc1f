"""Drop-in integrations with model libraries: ``torch_ext.integrations.hf`` (transformers)."""
