"""Credit for work: the round reports every member sends the coordinator, and their sender."""
