"""Looking at results: SQL over the committed tables (``reader``), output for people and files
(``output``), overlay panels and the HTML report (``html``)."""
