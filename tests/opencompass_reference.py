"""Reference copies of OpenCompass (0.5.4, and the copy hf-lin/ChatMusician vendors) that the eval tests hold
the project's re-implementation against: written out from its source, not from ours."""

# fmt: off
from __future__ import annotations

import re

import torch

ORIGINAL_HINT = (
    "Read the following questions from the four options (A, B, C and D) given in each question. "
    "Choose the best option."
)


def first_option_postprocess(text: str, options: str, cushion=True) -> str:
    """opencompass 0.5.4 utils/text_postprocessors.py::first_option_postprocess, copied (its f-strings
    made raw: every backslash in them is an invalid escape, kept as is, so the patterns are the same)."""
    patterns = [
        rf'答案是?\s*([{options}])',
        rf'答案是?\s*：\s*([{options}])',
        rf'答案是?\s*:\s*([{options}])',
        rf'答案选项应?该?是\s*([{options}])',
        rf'答案选项应?该?为\s*([{options}])',
        rf'答案应该?是\s*([{options}])',
        rf'答案应该?选\s*([{options}])',
        rf'答案选项为?\s*：\s*([{options}])',
        rf'答案选项为?\s+\(?\*?\*?([{options}])\*?\*?\)?',
        rf'答案选项是?\s*:\s*([{options}])',
        rf'答案为\s*([{options}])',
        rf'答案选\s*([{options}])',
        rf'选择?\s*([{options}])',
        rf'故选?\s*([{options}])'
        rf'只有选?项?\s?([{options}])\s?是?对',
        rf'只有选?项?\s?([{options}])\s?是?错',
        rf'只有选?项?\s?([{options}])\s?不?正确',
        rf'只有选?项?\s?([{options}])\s?错误',
        rf'说法不?对选?项?的?是\s?([{options}])',
        rf'说法不?正确选?项?的?是\s?([{options}])',
        rf'说法错误选?项?的?是\s?([{options}])',
        rf'([{options}])\s?是正确的',
        rf'([{options}])\s?是正确答案',
        rf'选项\s?([{options}])\s?正确',
        rf'所以答\s?([{options}])',
        rf'所以\s?([{options}][.。$]?$)',
        rf'所有\s?([{options}][.。$]?$)',
        rf'[\s，：:,]([{options}])[。，,\.]?$',
        rf'[\s，,：:][故即]([{options}])[。\.]?$',
        rf'[\s，,：:]因此([{options}])[。\.]?$',
        rf'[是为。]\s?([{options}])[。\.]?$',
        rf'因此\s?([{options}])[。\.]?$',
        rf'显然\s?([{options}])[。\.]?$',
        r'答案是\s?(\S+)(?:。|$)',
        r'答案应该是\s?(\S+)(?:。|$)',
        r'答案为\s?(\S+)(?:。|$)',
        rf'(?i)ANSWER\s*:\s*([{options}])',
        rf'[Tt]he answer is:?\s+\(?([{options}])\)?',
        rf'[Tt]he answer is:?\s+\(?\*?\*?([{options}])\*?\*?\)?',
        rf'[Tt]he answer is option:?\s+\(?([{options}])\)?',
        rf'[Tt]he correct answer is:?\s+\(?([{options}])\)?',
        rf'[Tt]he correct answer is option:?\s+\(?([{options}])\)?',
        rf'[Tt]he correct answer is:?.*?boxed{{([{options}])}}',
        rf'[Tt]he correct option is:?.*?boxed{{([{options}])}}',
        rf'[Tt]he correct answer option is:?.*?boxed{{([{options}])}}',
        rf'[Tt]he answer to the question is:?\s+\(?([{options}])\)?',
        rf'^选项\s?([{options}])',
        rf'^([{options}])\s?选?项',
        rf'(\s|^)[{options}][\s。，,：:\.$]',
        r'1.\s?(.*?)$',
        rf'1.\s?([{options}])[.。$]?$',
    ]  # fmt: skip
    cushion_patterns = [
        rf'([{options}]):',
        rf'([{options}])',
    ]  # fmt: skip
    if cushion:
        patterns.extend(cushion_patterns)
    for pattern in patterns:
        text = text.strip()
        match = re.search(pattern, text, re.DOTALL)
        if match:
            if match.group(1) is not None and match.group(1) != "":
                outputs = match.group(1)
            else:
                outputs = match.group(0)
            for i in options:
                if i in outputs:
                    return i
    return ""


# --- prompts: utils/prompt.py::safe_format, PromptTemplate, BaseRetriever.generate_ice, PPLInferencer.inference


def safe_format(input_str, **kwargs):
    for k, v in kwargs.items():
        input_str = input_str.replace(f"{{{k}}}", str(v))
    return input_str


def generate_ice(dev_rows, ice_template, ice_separator="\n", ice_eos_token="\n"):
    items = []
    for row in dev_rows:  # generate_ice_item: the label's template, </E> removed, safe_format with the row
        items.append(safe_format(ice_template[row["target"]].replace("</E>", ""), **row))
    return ice_separator.join(items) + ice_eos_token


def generate_label_prompt_item(prompt_template, row, ice, label):
    return safe_format(prompt_template[label].replace("</E>", ice), **row)


def ppl_prompts(test_rows, dev_rows, fix_id_list, ice_template, prompt_template, get_token_len, max_seq_len):
    """PPLInferencer.inference's steps 2-5.1: {label: [prompt per question]} (None ice_template: ZeroRetriever)."""
    zero = ice_template is None
    ice_idx_list = [[] if zero else list(fix_id_list) for _ in test_rows]

    def ice_of(idx_list):
        return "" if zero else generate_ice([dev_rows[i] for i in idx_list], ice_template)

    ice = [ice_of(ids) for ids in ice_idx_list]
    out = {}
    for label in prompt_template:
        prompt_list = []
        for idx in range(len(ice_idx_list)):
            prompt = generate_label_prompt_item(prompt_template, test_rows[idx], ice[idx], label)
            prompt_token_num = get_token_len(prompt)
            while len(ice_idx_list[idx]) > 0 and prompt_token_num > max_seq_len:
                ice_idx_list[idx] = ice_idx_list[idx][:-1]
                ice[idx] = ice_of(ice_idx_list[idx])
                prompt = generate_label_prompt_item(prompt_template, test_rows[idx], ice[idx], label)
                prompt_token_num = get_token_len(prompt)
            prompt_list.append(prompt)
        out[label] = prompt_list
    return out


def mtb_templates():
    """The original's MusicTheoryBench PPL templates (hint line, </E>, the question, the label)."""
    question_overall = "{input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}"
    ice_template = {opt: f"{question_overall}\nAnswer: {opt}\n" for opt in "ABCD"}
    prompt_template = {opt: f"{ORIGINAL_HINT}\n</E>{question_overall}\nAnswer: {opt}" for opt in "ABCD"}
    return ice_template, prompt_template


def mtb_prompt(test_row: dict, dev_rows: list[dict], label: str, few_shot: bool) -> str:
    ice_template, prompt_template = mtb_templates()
    ice = generate_ice(dev_rows, ice_template) if few_shot else ""  # FixKRetriever / ZeroRetriever
    return generate_label_prompt_item(prompt_template, test_row, ice, label)


def mmlu_ppl_ac766d(_name: str):
    """configs/datasets/mmlu/mmlu_ppl_ac766d.py's templates for one subject, copied."""
    _hint = f'The following are multiple choice questions (with answers) about  {_name.replace("_", " ")}.\n\n'
    question_overall = '{input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}'
    ice_template = {opt: f'{question_overall}\nAnswer: {opt}\n' for opt in ['A', 'B', 'C', 'D']}
    prompt_template = {opt: f'{_hint}</E>{question_overall}\nAnswer: {opt}' for opt in ['A', 'B', 'C', 'D']}
    return ice_template, prompt_template


# --- scoring: models/huggingface.py::HuggingFace.get_ppl / _get_ppl with batch_padding=False


def get_ppl(model, tokenizer, inputs, pad_token_id, max_seq_len):
    """One text at a time (batch_padding=False): tokenizer(..., truncation=True, max_length=max_seq_len), the
    logits in float, CrossEntropyLoss(ignore_index=pad), summed and divided by the non-pad token count."""
    out = []
    for text in inputs:
        input_ids = tokenizer([text], padding=False, truncation=True, max_length=max_seq_len)["input_ids"]
        input_ids = torch.tensor(input_ids)
        with torch.no_grad():
            outputs = model(input_ids)[0]
        shift_logits = outputs[..., :-1, :].contiguous().float()
        if outputs.dtype == torch.float64:  # tests run the model in float64 to compare to rounding
            shift_logits = outputs[..., :-1, :].contiguous()
        shift_labels = input_ids[..., 1:].contiguous()
        loss_fct = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=pad_token_id)
        loss = loss_fct(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1)).view(
            shift_labels.size()
        )
        lens = (input_ids != pad_token_id).sum(-1).cpu().numpy()
        out.append(float(loss.sum(-1).cpu().detach().numpy()[0] / lens[0]))
    return out


def pad_token_id(name_or_path):
    """HuggingFace._load_tokenizer: the tokenizer's own pad, else EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
