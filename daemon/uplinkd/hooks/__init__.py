"""The admin's hook files: their safety checks, the plan hooks run at each apply stage (run in a
child process beside the loop), and the event hooks run on link state changes."""
