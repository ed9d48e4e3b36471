export { FailureLog } from '../device/failure-log';
