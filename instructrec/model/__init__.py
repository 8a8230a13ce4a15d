"""The reranker: any Hugging Face seq2seq checkpoint scoring every candidate in one packed pass (`reranker`,
`batch`), its scoring and fusion with the retriever (`scoring`), instruction tuning (`training`) and LoRA
adapters (`lora`)."""
