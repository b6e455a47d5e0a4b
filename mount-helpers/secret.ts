// --secret-file, for tsmount and tsimg alike: the same reading as a secret object's file=.
export { readSecretFile } from '../drivers/objects.js';
