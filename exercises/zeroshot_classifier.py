"""
Exercise zeroshot_classifier: turn class names into a classifier with prompt templates, no training at all.

Read: CLIP (Radford et al. 2021, https://arxiv.org/abs/2103.00020), section 3.1.4 (prompt engineering and
ensembling); openai/CLIP notebooks/Prompt_Engineering_for_ImageNet.ipynb, zeroshot_classifier
(https://github.com/openai/CLIP).

    python exercises.py check zeroshot_classifier
    python exercises.py hint zeroshot_classifier

You will need: import torch; import torch.nn.functional as F; from tokenizer import tokenize.
"""


def template_features(model, classnames, templates, device):
    """The text embedding of every (class, template) prompt.

    model: a CLIP (model.py) in eval mode; classnames: C names, e.g. ["circle", "star"]; templates: M strings with
    one "{}", e.g. "a photo of a {}."; device: where the model is ("cpu").
    Returns a (C, M, D) float32 tensor on the CPU, NOT normalised: row c holds class c's M prompts, in template order.
    """
    # YOUR CODE HERE (about 4 lines)
    raise NotImplementedError("template_features: embed every prompt")


def class_prototypes(template_features):
    """CLIP's prompt ensemble: (C, M, D) per-template embeddings -> (C, D) class weights, unit length. Normalise
    each template's embedding, average over the templates, normalise again.
    """
    # YOUR CODE HERE (1 line)
    raise NotImplementedError("class_prototypes: average the templates")
