"""Beyond the paper: the experiments this project adds to the paper's, their control network and
their analysis. Nothing in the core (the top-level modules) imports from here."""
