"""Print the Ray auth token from AWS Secrets Manager (instance-profile credentials).

Used by cluster/aws-gpu.yaml's start commands so the token never sits in a file or a YAML:
    RAY_AUTH_TOKEN="$(python cluster/fetch_ray_token.py lkd-ray/auth-token)"
"""
import sys

import boto3


def main() -> None:
    secret_id = sys.argv[1] if len(sys.argv) > 1 else "lkd-ray/auth-token"
    print(boto3.client("secretsmanager").get_secret_value(SecretId=secret_id)["SecretString"].strip())


if __name__ == "__main__":
    main()
