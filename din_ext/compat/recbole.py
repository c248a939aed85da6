"""RecBole 1.2's DIN with din_ext inside: a model class for RecBole's documented custom-model flow.

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.trainer import Trainer
    from din_ext.compat.recbole import DIN

    config = Config(model=DIN, dataset="ml-100k", config_dict={...})   # RecBole's DIN keys (and its DIN.yaml)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    model = DIN(config, train_data.dataset).to(config["device"])
    trainer = Trainer(config, model)
    trainer.fit(train_data, valid_data)
    trainer.evaluate(test_data)

It keeps RecBole's DIN (``recbole.model.sequential_recommender.DIN``): the same config keys (``embedding_size``,
``mlp_hidden_size``, ``dropout_prob``, ``pooling_mode``), RecBole's feature embedding layer (every item feature,
token sequences pooled by ``pooling_mode``), the same attention (sigmoid MLP over ``[q, k, q - k, q * k]``,
hidden sizes ``mlp_hidden_size``, scores scaled by ``1/sqrt(H)``, no softmax) and the same tower
``[interest, target, interest * target] -> (Dropout, Linear, BatchNorm1d, Dice)* -> Linear``, trained with
BCE-with-logits on RecBole's labels. What differs (README, "Coming from RecBole"): the attention runs as din_ext's
kernel on jagged histories (padding skipped), and the tower's Dice is the paper's (trainable alpha, batch
statistics) where RecBole's has no statistics and an alpha that never trains.

Optional keys: ``attention_activation`` ("sigmoid" as RecBole; "dice", "relu", "prelu"), ``attention_hidden_size``
(default ``mlp_hidden_size``), ``normalization`` ("none", or "softmax"), ``din_backend`` (din_ext backend).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.init import constant_, xavier_normal_

from din_ext.modules import Dice, LocalActivationUnit

try:
    from recbole.model.abstract_recommender import SequentialRecommender
    from recbole.model.layers import ContextSeqEmbLayer
    from recbole.utils import FeatureType, InputType
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("din_ext.compat.recbole needs RecBole 1.2: pip install din_ext[recbole]") from exc


def _option(config, key, default):
    value = config[key]
    return default if value is None else value


class DIN(SequentialRecommender):
    """RecBole's DIN (``input_type`` pointwise, one label) whose attention and Dice are din_ext's.

    config: a RecBole Config (``LABEL_FIELD``, ``embedding_size``, ``mlp_hidden_size``, ``dropout_prob``,
    ``pooling_mode``, ``device``, ``numerical_features``); dataset: the training dataset.
    forward(user, item_seq (B, T), item_seq_len (B,), next_items (B,)) -> logits (B,).
    """

    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.LABEL_FIELD = config["LABEL_FIELD"]
        self.embedding_size = int(_option(config, "embedding_size", 10))
        self.mlp_hidden_size = [int(h) for h in _option(config, "mlp_hidden_size", [256, 256, 256])]
        self.dropout_prob = float(_option(config, "dropout_prob", 0.0))
        self.pooling_mode = _option(config, "pooling_mode", "mean")
        self.device = config["device"]
        self.types = ["user", "item"]
        numerical = config["numerical_features"] or []
        item_fields = dataset.get_item_feature().interaction.keys()
        # RecBole's count: float fields count only when they are numerical features (embedded)
        num_item_feature = sum(
            1 for field in item_fields
            if dataset.field2type[field] not in (FeatureType.FLOAT_SEQ, FeatureType.FLOAT) or field in numerical)
        width = num_item_feature * self.embedding_size  # H: the query / key width
        self.attention = LocalActivationUnit(
            width, [int(h) for h in _option(config, "attention_hidden_size", self.mlp_hidden_size)],
            activation=_option(config, "attention_activation", "sigmoid"),
            normalization=_option(config, "normalization", "none"), score_scale=width ** -0.5,
            backend=_option(config, "din_backend", "auto"))
        layers = []
        for a, b in zip([3 * width] + self.mlp_hidden_size[:-1], self.mlp_hidden_size):
            layers += [nn.Dropout(self.dropout_prob), nn.Linear(a, b), nn.BatchNorm1d(b), Dice(b)]
        self.dnn_mlp_layers = nn.Sequential(*layers)
        for module in self.dnn_mlp_layers:
            if isinstance(module, Dice):
                module.backend = self.attention.backend
        self.embedding_layer = ContextSeqEmbLayer(dataset, self.embedding_size, self.pooling_mode, self.device)
        self.dnn_predict_layers = nn.Linear(self.mlp_hidden_size[-1], 1)
        self.sigmoid = nn.Sigmoid()
        self.loss = nn.BCEWithLogitsLoss()
        self.apply(self._init_weights)
        self.other_parameter_name = ["embedding_layer"]

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Embedding):
            xavier_normal_(module.weight.data)
        elif isinstance(module, nn.Linear):
            xavier_normal_(module.weight.data)
            if module.bias is not None:
                constant_(module.bias.data, 0)

    def forward(self, user, item_seq, item_seq_len, next_items):
        max_length = item_seq.shape[1]
        sparse, dense = self.embedding_layer(user, torch.cat((item_seq, next_items.unsqueeze(1)), dim=-1))
        table = {}
        for kind in self.types:
            parts = [t for t in (sparse[kind], dense[kind]) if t is not None]
            features = torch.cat(parts, dim=-2)
            table[kind] = features.flatten(-2)  # (..., num_features * embedding_size)
        history, target = table["item"].split([max_length, 1], dim=1)
        target = target.squeeze(1)
        lengths = item_seq_len.long().clamp(0, max_length)
        valid = torch.arange(max_length, device=history.device)[None, :] < lengths[:, None]
        offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.long, device=history.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        interest = self.attention(target, history[valid], offsets=offsets, max_len=max_length)  # padding skipped
        x = torch.cat([interest, target, interest * target], dim=-1)
        return self.dnn_predict_layers(self.dnn_mlp_layers(x)).squeeze(1)

    def _inputs(self, interaction):
        return (interaction[self.USER_ID], interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN],
                interaction[self.POS_ITEM_ID])

    def calculate_loss(self, interaction):
        return self.loss(self.forward(*self._inputs(interaction)), interaction[self.LABEL_FIELD])

    def predict(self, interaction):
        return self.sigmoid(self.forward(*self._inputs(interaction)))


__all__ = ["DIN"]
