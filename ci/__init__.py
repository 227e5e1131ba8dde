"""CI tooling: notebook runner, contract checker, catalogue/README builder, book, benchmark."""
