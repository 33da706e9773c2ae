"""
Exercise coop_prompts: CoOp's learned prompt, context vectors that replace words in the text tower's input.

Read: CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models", https://arxiv.org/abs/2109.01134),
section 3.2; the released code, KaiyangZhou/CoOp trainers/coop.py, PromptLearner and TextEncoder
(https://github.com/KaiyangZhou/CoOp).

    python exercises.py check coop_prompts
    python exercises.py hint coop_prompts

You will need: import torch.
"""


def coop_prompts(self):
    """The forward pass of adapters.CoOpPrompts: the class weights of the prompts [SOS] v_1 ... v_M [CLASS c] . [EOS].

    self is an adapters.CoOpPrompts with
        self.model[0]: the frozen CLIP (model.py); its token_embedding maps ids to (width,) vectors, and
            encode_text_embeddings(x, tokens) runs the text tower from embeddings x (C, L, width) on, pooled at the
            EOT token of each row of tokens (C, L)
        self.tokens (C, L): the prompts "X X ... X <class name>." tokenized, with M placeholder X's after SOS
        self.ctx (M, width): the learned context vectors v_1 .. v_M, shared by all classes
    Returns (C, embed_dim): one class weight per prompt. Gradients must flow to self.ctx (it is what CoOp trains).
    """
    # YOUR CODE HERE (about 6 lines)
    raise NotImplementedError("coop_prompts: put the context into the prompts")
