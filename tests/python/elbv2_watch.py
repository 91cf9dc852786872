"""An independent ELBv2 client for the traffic tests, on boto3 (which moto brings).

    elbv2_watch.py ENDPOINT create NAME TARGET...   creates a VPC and an instance target group,
                                                    registers the targets, prints the group's ARN
    elbv2_watch.py ENDPOINT watch ARN OUT           polls DescribeTargetHealth every 20 ms and
                                                    appends "unix_ms registered,ids" to OUT each
                                                    time the registered set changes; stops when
                                                    OUT.stop exists

Credentials and region come from the environment tests/run sets (dummy, local server only).
"""

import os
import sys
import time

import boto3


def client(endpoint, service):
    return boto3.client(service, endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"))


def create(endpoint, name, targets):
    vpc = client(endpoint, "ec2").create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    elb = client(endpoint, "elbv2")
    group = elb.create_target_group(Name=name, Protocol="HTTP", Port=80, VpcId=vpc, TargetType="instance")
    arn = group["TargetGroups"][0]["TargetGroupArn"]
    elb.register_targets(TargetGroupArn=arn, Targets=[{"Id": target} for target in targets])
    print(arn)


def watch(endpoint, arn, out):
    elb = client(endpoint, "elbv2")
    last = None
    with open(out, "a", encoding="utf-8") as log:
        while not os.path.exists(out + ".stop"):
            health = elb.describe_target_health(TargetGroupArn=arn)["TargetHealthDescriptions"]
            registered = sorted(
                entry["Target"]["Id"]
                for entry in health
                if entry["TargetHealth"]["State"] not in ("draining", "unused")
            )
            if registered != last:
                log.write(f"{int(time.time() * 1000)} {','.join(registered)}\n")
                log.flush()
                last = registered
            time.sleep(0.02)


def main():
    endpoint, command = sys.argv[1], sys.argv[2]
    if command == "create":
        create(endpoint, sys.argv[3], sys.argv[4:])
    elif command == "watch":
        watch(endpoint, sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
