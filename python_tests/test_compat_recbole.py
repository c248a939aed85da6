"""din_ext.compat.recbole.DIN: trained by RecBole 1.2.1's Trainer on the ml-100k that ships in the recbole wheel."""

from __future__ import annotations

import os

import pytest
import torch

recbole = pytest.importorskip("recbole", reason="pip install din_ext[recbole] (CI does, in its own venv)")

from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.model.layers import SequenceAttLayer  # noqa: E402
from recbole.model.sequential_recommender import DIN as RecBoleDIN  # noqa: E402
from recbole.trainer import Trainer  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from din_ext import LocalActivationUnit  # noqa: E402
from din_ext.compat.recbole import DIN  # noqa: E402


def settings(tmp):
    """RecBole's DIN on a small ml-100k: rating >= 4 is a click, users with 10-100 ratings, histories up to 10."""
    return {"data_path": os.path.join(os.path.dirname(recbole.__file__), "dataset_example"),
            "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                         "item": ["item_id", "release_year", "class"]},
            "threshold": {"rating": 4}, "train_neg_sample_args": None, "user_inter_num_interval": "[10,100]",
            "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "labeled"},
            "metrics": ["AUC", "LogLoss"], "valid_metric": "AUC", "epochs": 2, "learning_rate": 0.005,
            "train_batch_size": 1024, "eval_batch_size": 4096, "MAX_ITEM_LIST_LENGTH": 10, "embedding_size": 8,
            "mlp_hidden_size": [32, 16], "use_gpu": False, "show_progress": False, "checkpoint_dir": str(tmp),
            "seed": 2020, "reproducibility": True, "state": "ERROR"}


def train(cls, tmp):
    """RecBole's documented custom-model flow: Config, create_dataset, data_preparation, Trainer.fit/evaluate."""
    config = Config(model=cls, dataset="ml-100k", config_dict=settings(tmp))
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = cls(config, train_data.dataset).to(config["device"])
    here = os.getcwd()
    os.chdir(tmp)  # the Trainer writes log_tensorboard/ into the working directory
    try:
        trainer = Trainer(config, model)
        trainer.fit(train_data, valid_data, verbose=False, saved=False)
        return config, train_data, model, trainer.evaluate(test_data, load_best_model=False)
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train(DIN, tmp_path_factory.mktemp("din_ext"))


def test_trainer_trains_it_on_ml100k_as_recboles_din(trained, tmp_path):
    _, _, _, ours = trained
    _, _, _, theirs = train(RecBoleDIN, tmp_path)
    assert ours["auc"] > 0.6 and abs(ours["auc"] - theirs["auc"]) < 0.01, (ours, theirs)


def test_state_dict_round_trip(trained):
    config, train_data, model, _ = trained
    batch = next(iter(train_data))
    again = DIN(config, train_data.dataset)
    again.load_state_dict(model.state_dict())
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.predict(batch), model.predict(batch), rtol=0, atol=0)


def test_attention_is_recboles_with_padding_skipped():
    """RecBole's SequenceAttLayer (sigmoid MLP, padding scores 0, scaled by 1/sqrt(H)) with the same weights."""
    torch.manual_seed(0)
    B, T, H = 6, 7, 16
    theirs = SequenceAttLayer(torch.arange(T).view(1, -1), [4 * H, 32, 16], activation="Sigmoid",
                              softmax_stag=False, return_seq_weight=False)
    ours = LocalActivationUnit(H, (32, 16), activation="sigmoid", score_scale=H ** -0.5)
    linears = [m for m in theirs.att_mlp_layers.mlp_layers if isinstance(m, torch.nn.Linear)]
    for mine, their in zip(ours.linears, linears):
        mine.load_state_dict(their.state_dict())
    ours.out.load_state_dict(theirs.dense.state_dict())
    query, keys = torch.randn(B, H), torch.randn(B, T, H)
    lengths = torch.tensor([0, 1, 7, 3, 5, 2])
    expected = theirs(query, keys, lengths).squeeze(1)
    torch.testing.assert_close(ours(query, keys, lengths=lengths), expected, rtol=1e-5, atol=1e-6)
