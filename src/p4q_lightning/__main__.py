from p4q_lightning.cli import main

main()
