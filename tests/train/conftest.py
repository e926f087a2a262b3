"""Tiny causal LMs and tokenizers built locally (no Hub), once per session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = [
    "how do i bake bread? mix flour, water, salt and yeast, then bake it.",
    "tell me a joke. why did the chicken cross the road? to get to the other side.",
    "is it safe to mix bleach and ammonia? no, never mix them: the fumes are toxic.",
    "what is the capital of france? paris is the capital of france.",
    "<|im_start|>user hello<|im_end|> <|im_start|>assistant hi there, how can i help?<|im_end|>",
]


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(TEXT * 20, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-lm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


@pytest.fixture(scope="session")
def other_lm(tiny_lm, tmp_path_factory):
    """A second tiny policy over the same tokenizer, initialised differently (a reference that is not the policy,
    or a "pre-aligned" model whose log-ratios are not zero)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    model, tok, _ = tiny_lm
    torch.manual_seed(1)
    other = LlamaForCausalLM(model.config)
    path = tmp_path_factory.mktemp("other-lm")
    other.save_pretrained(path)
    tok.save_pretrained(path)
    return other, path


MOCAN_PROMPTS = [f"tell me about item {i}." for i in range(24)]


@pytest.fixture(scope="session")
def mocan_run(tiny_lm, tmp_path_factory):
    """The MoCAN chain (collect → dual → label → DPO → evaluate) on the tiny LM with toy scorers a reward `brev`
    and a constraint `e` it can learn: (DemoConfig, its folder, the evaluation report). Shared by the chain's tests
    and the correction rounds' (tests/train/test_refine.py)."""
    pytest.importorskip("trl")
    from dataclasses import replace

    from train.demo import DemoConfig, run_chain

    _, _, path = tiny_lm
    out = tmp_path_factory.mktemp("mocan")
    cfg = DemoConfig(policy=str(path), reward="brev",
                     scorers=["brev=tests.train.toy_scorers:brevity", "e=tests.train.toy_scorers:e_share"],
                     train_prompts=list(MOCAN_PROMPTS), eval_prompts=[f"what is thing {i}?" for i in range(96)], k=8,
                     max_new_tokens=12, beta=0.1, margin_frac=0.8, mode="soft", pairs_per_prompt=8,
                     dpo=replace(DemoConfig().dpo, epochs=3, lr=3e-3, batch_size=16), max_length=64)  # fmt: skip
    return cfg, out, run_chain(cfg, out, say=lambda *_: None)
