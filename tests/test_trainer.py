"""trainer.py: the train-then-select loop shared by the few-shot adapters and AA-CLIP, and its cosine schedule."""
import torch
import torch.nn as nn

from trainer import train_and_select


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def run(scores, epochs=3, patience=0):
    """A linear layer trained on a fixed loss, validated with the given scores in turn; returns the module, the states
    seen by each validate() call, and train_and_select's result."""
    torch.manual_seed(0)
    module = nn.Linear(3, 1)
    scores, states = iter(scores), []

    def validate():
        states.append({k: v.clone() for k, v in module.state_dict().items()})
        return next(scores)
    batches = [torch.randn(4, 3) for _ in range(2)]
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    result = train_and_select([module], optimizer, constant(optimizer), lambda epoch: batches,
                              lambda b: module(b).pow(2).mean(), validate, epochs, patience=patience)
    return module, states, result


def test_keeps_the_best_validated_state():
    """The state of the epoch with the best val score is loaded back, not the last one."""
    module, states, (best_epoch, best, history) = run([0.1, 0.9, 0.3, 0.2])
    assert (best_epoch, best) == (1, 0.9)
    assert [h["val"] for h in history] == [0.9, 0.3, 0.2] and all(h["loss"] is not None for h in history)
    assert all(torch.equal(module.state_dict()[k], states[1][k]) for k in states[1])  # after epoch 1
    assert not torch.equal(states[1]["weight"], states[3]["weight"])


def test_initialisation_is_kept_when_training_only_hurts():
    module, states, (best_epoch, _, _) = run([0.5, 0.4, 0.3, 0.2])
    assert best_epoch == 0 and all(torch.equal(module.state_dict()[k], states[0][k]) for k in states[0])


def test_patience_stops_early_and_tuples_compare_in_order():
    """patience 1: stop after one epoch without improvement; (accuracy, -loss) breaks accuracy ties by the loss."""
    _, _, (best_epoch, best, history) = run([(0.5, -2.0), (0.5, -1.0), (0.5, -1.5), (0.9, 0.0)], epochs=3, patience=1)
    assert (best_epoch, best) == (1, (0.5, -1.0)) and len(history) == 2


def test_non_finite_loss_is_skipped():
    module = nn.Linear(2, 1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    _, _, history = train_and_select([module], optimizer, constant(optimizer), lambda e: [None],
                                     lambda b: torch.tensor(float("nan"), requires_grad=True), lambda: 0.0, 1)
    assert history[0]["skipped"] == 1 and history[0]["loss"] is None
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
