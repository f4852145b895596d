"""Supervised fine-tuning of UHR-BAT (imports are lazy: nothing heavy loads with this package).

* `data`      `uhrbat data prepare-sft`: released parquet / LLaVA JSON -> validated JSONL manifest
* `tokenize`  ChatML ids, assistant-only labels, relevance query index (never the answer)
* `dataset`, `collator`  lazy tiles via the processor's pyramid; right/left padding
* `freeze`    `--train` parts, LoRA / QLoRA (peft), merged saves, LLM activation checkpointing
* `recipe`    YAML recipes + `key=value` overrides (`recipes/uhrbat-sft.yaml` = the released one)
* `trainer`   `UhrBatTrainer` (HF Trainer; DeepSpeed / FSDP configs in `configs/`), `run_training`
* `masks`     `uhrbat masks`: SAM (transformers) segment-id maps in the tile format
* `testing`   tiny checkpoints / data for tests and benchmarks
"""
