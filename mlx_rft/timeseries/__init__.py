"""Time-series language model: series enter the LLM as soft tokens next to the prompt's text.

Data: `ucr` (the UCR/UEA sets shipped in the `aeon` wheel, and a `.ts` reader), `rows` (the
multimodal row record and a JSONL reader for user data), `baselines` (1-NN and majority accuracy).
"""
