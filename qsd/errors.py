"""The single exception type that turns into a QMP error reply or a command-line error."""


class QMPError(Exception):
    """An error a user sees: QEMU's error class and its human-readable text."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_qmp(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}
