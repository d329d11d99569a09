"""RAFT: 11 real-world few-shot classification tasks, read from the dataset's CSV files.

Point `raft_dir` (or $IA3_JAX_RAFT_DIR) at a copy of the RAFT data: either the
`data/` folder of the `ought/raft` dataset repository or its parent, holding
`<task>/train.csv` (50 labelled rows) and `<task>/test_unlabeled.csv`.
Columns are the task's fields, `ID` and `Label` (1-based label index, 0 for
unlabelled; a label name works too). Fields reach templates in snake case.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ia3_jax.data import DatasetSpec, fewshot
from ia3_jax.data.sources import CsvSource
from ia3_jax.data.templates import DataError, load_templates

TEMPLATE_DIR = os.path.join(os.path.dirname(__file__), "templates")

_BANKING_77 = """Refund_not_showing_up activate_my_card age_limit apple_pay_or_google_pay atm_support
automatic_top_up balance_not_updated_after_bank_transfer balance_not_updated_after_cheque_or_cash_deposit
beneficiary_not_allowed cancel_transfer card_about_to_expire card_acceptance card_arrival
card_delivery_estimate card_linking card_not_working card_payment_fee_charged card_payment_not_recognised
card_payment_wrong_exchange_rate card_swallowed cash_withdrawal_charge cash_withdrawal_not_recognised
change_pin compromised_card contactless_not_working country_support declined_card_payment
declined_cash_withdrawal declined_transfer direct_debit_payment_not_recognised disposable_card_limits
edit_personal_details exchange_charge exchange_rate exchange_via_app extra_charge_on_statement
failed_transfer fiat_currency_support get_disposable_virtual_card get_physical_card getting_spare_card
getting_virtual_card lost_or_stolen_card lost_or_stolen_phone order_physical_card passcode_forgotten
pending_card_payment pending_cash_withdrawal pending_top_up pending_transfer pin_blocked receiving_money
request_refund reverted_card_payment? supported_cards_and_currencies terminate_account
top_up_by_bank_transfer_charge top_up_by_card_charge top_up_by_cash_or_cheque top_up_failed top_up_limits
top_up_reverted topping_up_by_card transaction_charged_twice transfer_fee_charged transfer_into_account
transfer_not_received_by_recipient transfer_timing unable_to_verify_identity verify_my_identity
verify_source_of_funds verify_top_up virtual_card_not_working visa_or_mastercard why_verify_identity
wrong_amount_of_cash_received wrong_exchange_rate_for_cash_withdrawal""".split()

# task -> (CSV fields in the prompt, label names in label-index order)
RAFT_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ade_corpus_v2": (("Sentence",), ("ADE-related", "not ADE-related")),
    "banking_77": (("Query",), tuple(_BANKING_77)),
    "neurips_impact_statement_risks": (("Paper title", "Paper link", "Impact statement"),
                                       ("doesn't mention a harmful application",
                                        "mentions a harmful application")),
    "one_stop_english": (("Article",), ("advanced", "elementary", "intermediate")),
    "overruling": (("Sentence",), ("not overruling", "overruling")),
    "semiconductor_org_types": (("Paper title", "Organization name"),
                                ("company", "research institute", "university")),
    "systematic_review_inclusion": (("Title", "Abstract", "Authors", "Journal"), ("included", "not included")),
    "tai_safety_research": (("Title", "Abstract Note", "Url", "Publication Year", "Item Type", "Author",
                             "Publication Title"), ("TAI safety research", "not TAI safety research")),
    "terms_of_service": (("Sentence",), ("not potentially unfair", "potentially unfair")),
    "tweet_eval_hate": (("Tweet",), ("hate speech", "not hate speech")),
    "twitter_complaints": (("Tweet text",), ("complaint", "no complaint")),
}
SPLIT_FILES = {"train": "train.csv", "test": "test_unlabeled.csv"}


def snake(name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def label_index(value: Any, labels: tuple[str, ...]) -> int:
  """RAFT's Label column (1-based index, 0 = unlabelled, or a name) -> 0-based index or -1."""
  text = str(value).strip()
  if text in ("", "0", "Unlabeled"):
    return -1
  if text.isdigit():
    index = int(text)
    if not 1 <= index <= len(labels):
      raise ValueError(f"field 'Label' = {index} is outside 1..{len(labels)} ({len(labels)} labels)")
    return index - 1
  if text in labels:
    return labels.index(text)
  raise ValueError(f"field 'Label' = {text!r} is not a label: {list(labels)}")


class RaftSource(CsvSource):
  """One RAFT task's CSV files; says where to get them when they are missing."""

  def __init__(self, task: str, raft_dir: str | None):
    self.task = task
    self.raft_dir = raft_dir
    fields, labels = RAFT_TASKS[task]
    base = raft_dir or ""
    if raft_dir and os.path.isdir(os.path.join(raft_dir, "data")):
      base = os.path.join(raft_dir, "data")
    files = {s: os.path.join(base, task, f) for s, f in SPLIT_FILES.items()}

    def adapt(row: dict[str, Any]) -> dict[str, Any]:
      out = {snake(k): v for k, v in row.items() if k != "Label"}
      for field in fields:
        if field not in row:
          raise ValueError(f"missing field {field!r} (CSV columns: {sorted(row)})")
      out["label"] = label_index(row.get("Label", 0), labels)
      return out

    super().__init__(files, name=f"raft {task}", adapter=adapt)

  def iterate(self, split):
    if not self.raft_dir:
      raise DataError(f"{self.name}: RAFT data directory not set: pass raft_dir= to "
                      "ia3_jax.tasks.register_all or set IA3_JAX_RAFT_DIR to a folder holding "
                      f"<task>/train.csv and <task>/test_unlabeled.csv (the data/ folder of the "
                      "ought/raft dataset)")
    return super().iterate(split)


def specs(raft_dir: str | None, task_ids: dict[str, int]) -> list[DatasetSpec]:
  """DatasetSpecs of the 11 RAFT tasks: train on all 50 labelled rows, predict the test set."""
  out = []
  for task, (_, labels) in RAFT_TASKS.items():
    key = f"raft_{task}"
    out.append(DatasetSpec(
        key=key, source=RaftSource(task, raft_dir),
        templates=load_templates(os.path.join(TEMPLATE_DIR, f"raft_{task}.yaml")),
        train_split="train", eval_split="test", num_shots=fewshot.RAFT_NUM_SHOTS,
        seeds=fewshot.TFEW_SEEDS, num_choices=len(labels), unlabeled_splits=frozenset({"test"}),
        task_id=task_ids[key]))
  return out
