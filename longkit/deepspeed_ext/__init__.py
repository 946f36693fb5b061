"""DeepSpeed extension (not built yet): a ``"longkit"`` section in the DeepSpeed JSON config that wires
Ulysses / LASP-2 sequence parallelism and activation offload for HF models. Tracked in the issues; see the
README's feature table. Nothing here is importable API yet."""
