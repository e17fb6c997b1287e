"""glm4voice.serve.board: what a caller knows of each replica, from the streams themselves."""

from glm4voice.serve.board import ReplicaBoard


def test_a_board_counts_what_was_routed_and_what_is_open_and_keeps_the_last_report():
    board = ReplicaBoard()
    board.accepted("a", {"accepted": 1})
    board.accepted("a", {"accepted": 2})
    board.accepted("b", {"accepted": 7})
    board.ended("a")
    board.lost("b")
    entries = {e["replica"]: e for e in board.as_list()}
    assert entries["a"] == {"replica": "a", "reported": {"accepted": 2}, "routed": 2, "open": 1, "lost": False}
    assert entries["b"]["lost"] is True and entries["b"]["open"] == 1
