"""vLLM plugins (not built yet): speculative-decoding drafters (suffix + copy) and KV-cache plugins,
registered through ``vllm.general_plugins`` entry points. See the README's feature table."""
