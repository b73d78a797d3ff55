from mmtoken.cli import main

main()
