"""Model runners on the library's ops: llama.LlamaRunner runs a HF transformers Llama-family
model's weights through them (transformers is only needed to load the model)."""
