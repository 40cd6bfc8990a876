"""Train the embedded tiny tokenizer on the synthetic corpus and write it with its chat template.

Run `python -m data_recipes.tiny_tokenizer` to rebuild `configs/tiny/tokenizer/` (committed, so nothing is trained at
run time). Byte-level BPE, so any UTF-8 text is encodable; digits are split one per token, which is what makes
arithmetic learnable for a small model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data_recipes.synthetic_math import MathTaskConfig, generate_splits

SPECIAL_TOKENS = ["<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>"]
VOCAB_SIZE = 512
# Added after training, so the ids above stay as they were (the model's vocabulary, 384, has room): the tool syntax
# and its JSON keys, which a BPE trained on arithmetic splits into bytes (a call took 74 tokens, now about 20).
TOOL_TOKENS = ["<TOOLCALL>", "</TOOLCALL>", "<TOOL_RESPONSE>", "</TOOL_RESPONSE>", '{"name": "', '", "arguments": {',
               '"key": "', '"value": ', '"a": ', '"b": ', "get_value", "set_value"]

# The reasoning toggle of Nemotron Nano 2, in miniature:
# - `/think` or `/no_think` in a system or user message switches reasoning; the last one seen wins; default on;
#   the keyword is removed from the rendered text.
# - The assistant turn is prefilled with `<think>\n` (on) or `<think></think>` (off).
# - Earlier assistant turns keep only the text after `</think>`.
# - The final assistant message of a training conversation renders its `reasoning_content` (or the inline
#   `<think>...</think>` part of its content) inside the think block, then `\n` and the answer.
# Tools, compact for a small model: the system turn lists `Tools: name(param, ...); ...`; an assistant turn's calls
# follow its answer as `<TOOLCALL>[{"name": ..., "arguments": {...}}]</TOOLCALL>` (the Nano 2 syntax); the results
# of consecutive tool messages share one user turn as `<TOOL_RESPONSE>[...]</TOOL_RESPONSE>`.
CHAT_TEMPLATE = r"""
{%- macro calls_text(m) -%}
  {%- if m.get('tool_calls') -%}
    {{- '<TOOLCALL>[' -}}
    {%- for c in m['tool_calls'] -%}
      {{- '{"name": ' + c['function']['name'] | tojson + ', "arguments": ' + c['function']['arguments'] | tojson + '}' -}}
      {%- if not loop.last -%}{{- ', ' -}}{%- endif -%}
    {%- endfor -%}
    {{- ']</TOOLCALL>' -}}
  {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(reasoning=true, system='') -%}
{%- for m in messages -%}
  {%- if m['role'] in ['system', 'user'] -%}
    {%- set on_at = m['content'].rfind('/think') -%}
    {%- set off_at = m['content'].rfind('/no_think') -%}
    {%- if off_at > on_at -%}{%- set ns.reasoning = false -%}
    {%- elif on_at > off_at -%}{%- set ns.reasoning = true -%}{%- endif -%}
  {%- endif -%}
  {%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endif -%}
{%- endfor -%}
{%- if enable_thinking is defined -%}{%- set ns.reasoning = enable_thinking -%}{%- endif -%}
{{- '<|system|>' + ns.system.replace('/no_think', '').replace('/think', '').strip() -}}
{%- if tools -%}
  {{- '\nTools: ' -}}
  {%- for t in tools -%}
    {{- t['function']['name'] + '(' + (t['function'].get('parameters', {}).get('properties', {}) | list | join(', ')) + ')' -}}
    {%- if not loop.last -%}{{- '; ' -}}{%- endif -%}
  {%- endfor -%}
{%- endif -%}
{{- '<|end|>' -}}
{%- for m in messages -%}
  {%- set text = m['content'].replace('/no_think', '').replace('/think', '').strip() -%}
  {%- if m['role'] == 'user' -%}
    {{- '<|user|>' + text + '<|end|>' -}}
  {%- elif m['role'] == 'tool' -%}
    {%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|user|><TOOL_RESPONSE>[' -}}{%- else -%}{{- ', ' -}}{%- endif -%}
    {{- m['content'] -}}
    {%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- ']</TOOL_RESPONSE><|end|>' -}}{%- endif -%}
  {%- elif m['role'] == 'assistant' -%}
    {%- set answer = m['content'].split('</think>')[-1].strip() -%}
    {%- if loop.last and not add_generation_prompt -%}
      {%- if ns.reasoning -%}
        {%- if m.get('reasoning_content') -%}{%- set trace = m['reasoning_content'] -%}
        {%- elif '</think>' in m['content'] -%}{%- set trace = m['content'].split('</think>')[0].replace('<think>', '').lstrip('\n') -%}
        {%- else -%}{%- set trace = '' -%}{%- endif -%}
        {{- '<|assistant|><think>\n' + trace + '</think>\n' + answer + calls_text(m) + '<|end|>' -}}
      {%- else -%}
        {{- '<|assistant|><think></think>\n' + answer + calls_text(m) + '<|end|>' -}}
      {%- endif -%}
    {%- else -%}
      {{- '<|assistant|>' + answer + calls_text(m) + '<|end|>' -}}
    {%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant|><think>\n' if ns.reasoning else '<|assistant|><think></think>' -}}
{%- endif -%}
"""


def _corpus(seed: int) -> list[str]:
    splits = generate_splits(MathTaskConfig(seed=seed))
    texts = []
    for rows in splits.values():
        for row in rows:
            for message in row["messages"]:
                texts.append(message["content"])
                texts.append(message.get("reasoning_content", ""))
    # A little generic text so that code and instructions tokenize into more than bytes.
    texts += ["def f(x):\n    return x + 1\n", "assert f(2) == 3", "Write a function", "Answer in JSON"] * 50
    return texts


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<|end|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE.strip(),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(TOOL_TOKENS)
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="configs/tiny/tokenizer", help="Directory to write the tokenizer to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the corpus the tokenizer is trained on.")
    args = parser.parse_args()
    tokenizer = build_tokenizer(args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out} ({len(tokenizer)} tokens)")


if __name__ == "__main__":
    main()
