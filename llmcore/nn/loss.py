"""Placeholder: replaced by the cross-entropy work."""
import torch


class CrossEntropyLoss(torch.nn.Module):
    pass


class LinearCrossEntropyLoss(torch.nn.Module):
    pass
